"""Published model prices, shipped as data (`prices.json`): used for any deployment that
configures no `price`, and for the deployments a zero-config start makes from the providers'
API keys in the environment.

The table is converted from LiteLLM's `model_prices_and_context_window.json` (USD per token)
into USD per 1M tokens per bucket, with its date and source. `agentnode proxy prices --update
FILE` converts a newer copy of that file into `<state_dir>/prices.json`, which then wins over
the shipped table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from agentnode.errors import ConfigError

__all__ = ["SHIPPED", "PriceTable", "convert_litellm", "load_table"]

SHIPPED = Path(__file__).with_name("prices.json")
_PROVIDERS = ("openai", "anthropic")
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Per model: kind and USD per 1M tokens per bucket (decimal strings), with provenance."""

    date: str
    source: str
    models: dict[str, dict[str, str]]

    def kind_models(self, kind: str) -> list[str]:
        """The table's models of one provider kind, sorted."""
        return sorted(m for m, p in self.models.items() if p["kind"] == kind)


def load_table(state_dir: Path | None = None) -> PriceTable:
    """`<state_dir>/prices.json` when an update put one there, else the shipped table."""
    path = SHIPPED
    if state_dir is not None and (state_dir / "prices.json").is_file():
        path = state_dir / "prices.json"
    try:
        raw = json.loads(path.read_text())
        return PriceTable(raw["date"], raw["source"], raw["models"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"price table {path} is unreadable: {e} (agentnode proxy prices --update FILE)"
        ) from None


def _per_million(entry: dict[str, Any], key: str) -> str | None:
    v = entry.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return format((Decimal(repr(v)) * _MILLION).normalize(), "f")


def convert_litellm(raw: Any, *, source: str) -> dict[str, Any]:
    """LiteLLM's price map → this table: chat models of OpenAI and Anthropic (fine-tunes left
    out), reasoning priced as output where no price of its own is given."""
    if not isinstance(raw, dict):
        raise ConfigError("price file is not a JSON object of models (LiteLLM's format)")
    models: dict[str, dict[str, str]] = {}
    for name, e in raw.items():
        if not isinstance(e, dict) or e.get("litellm_provider") not in _PROVIDERS:
            continue
        if e.get("mode") != "chat" or name.startswith("ft:") or "/" in name:
            continue
        inp, out = _per_million(e, "input_cost_per_token"), _per_million(e, "output_cost_per_token")
        if inp is None or out is None:
            continue
        row = {"kind": e["litellm_provider"], "input": inp, "output": out}
        row["cached_input"] = _per_million(e, "cache_read_input_token_cost") or inp
        row["cache_write"] = _per_million(e, "cache_creation_input_token_cost") or inp
        hour = _per_million(e, "cache_creation_input_token_cost_above_1hr")
        if hour is not None:
            row["cache_write_1h"] = hour
        row["reasoning"] = _per_million(e, "output_cost_per_reasoning_token") or out
        models[name] = row
    if not models:
        raise ConfigError("price file lists no OpenAI or Anthropic chat model (LiteLLM's format)")
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "source": source,
        "models": dict(sorted(models.items())),
    }
