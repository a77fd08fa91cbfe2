"""Attribution: request headers -> validated chargeback labels.

Label values come from clients, so they are constrained here, once, before they reach SQL or
metric attributes: bounded length and a conservative charset. Storage and metrics still bind
values as data, never as names or SQL text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from extproc.config import AttributionSettings
from extproc.stats import SidecarStats

log = logging.getLogger(__name__)

INVALID = "invalid"
_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+\- ]*")


class Attribution:
    def __init__(self, settings: AttributionSettings, stats: SidecarStats) -> None:
        self._headers = dict(settings.headers)
        self._max_len = settings.max_value_length
        self._missing = settings.unattributed
        self._stats = stats

    @property
    def unattributed(self) -> str:
        return self._missing

    @property
    def header_names(self) -> tuple[str, ...]:
        return tuple(self._headers)

    def labels(self, headers: Mapping[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for header, label in self._headers.items():
            raw = headers.get(header)
            out[label] = self._missing if raw is None else self._validate(label, raw)
        return out

    def _validate(self, label: str, value: str) -> str:
        value = value.strip()
        if not value:
            return self._missing
        if len(value) <= self._max_len and _ALLOWED.fullmatch(value):
            return value
        self._stats.labels_rejected[label] += 1
        log.warning(
            "rejected %s label value (%d chars, must match %s and be <= %d chars): %r",
            label, len(value), _ALLOWED.pattern, self._max_len, value[:64],
        )
        return INVALID
