"""Alias of the gateway app under its former name: `build_frontend_app(cfg, tok, max_model_len,
prefill_urls)` builds the gateway over the given prefill URLs."""

from __future__ import annotations

from fastapi import FastAPI

from pd_serve.config import ServeConfig
from pd_serve.gateway.app import build_gateway_app
from pd_serve.gateway.scenarios import parse_instances
from pd_serve.models.tokenizer import Tokenizer


def build_frontend_app(cfg: ServeConfig, tok: Tokenizer, max_model_len: int,
                       prefill_urls: list[str]) -> FastAPI:
    return build_gateway_app(cfg, tok, max_model_len, parse_instances(prefill_urls))
