"""Planning: from a typed config to what a run will do, checked before any weights load.

Above the schemas (saetrain/config.py) and the components it asks (the dictionaries' registry, the
site table); below the run. `validate` / `to_config` (validate.py), the dictionaries a config trains
and their folders (expand.py), site patterns over layers (site_patterns.py), unknown keys
(keys.py), checks against the model's config file and the data (preflight.py).
"""
