"""One line of ``aipo doctor``'s report (shared by :mod:`aipo.commands.doctor` and
:mod:`aipo.commands.doctor_stack`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Check:
    """The outcome of one check, as one line of the report."""

    status: Literal["ok", "warn", "FAIL"]
    name: str
    detail: str

    def render(self) -> str:
        """``status  name  detail``, aligned."""
        return f"{self.status:<4}  {self.name:<24}  {self.detail}"
