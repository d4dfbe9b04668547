"""Test-wide settings: never touch the network or the user's caches."""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="saetrain-test-hf-"))
