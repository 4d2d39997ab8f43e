"""What a request handler may use: one bundle per app, in `app.extensions["tinkerq"]`."""

from __future__ import annotations

from dataclasses import dataclass

from config.settings import Settings
from store.db import Store
from store.doorbell import Doorbell
from store.downloads import Signer
from store.model_info import ModelInfo
from tasks.submit import Submitter


@dataclass
class Services:
    settings: Settings
    store: Store
    doorbell: Doorbell
    model: ModelInfo
    submit: Submitter  # the one submit path (validate, write the row, dedupe, send)
    signer: Signer  # download URLs of exported weights
    trace_signer: Signer  # download URLs of session traces
    jwt_key: str  # signs the JWTs of auth/token (app/auth.py)
