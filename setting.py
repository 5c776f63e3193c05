"""A setting as data: what one curve of the figures and one line per ratio of the table ran with.

A `Setting` is a policy with its options, an allocation with its options, the mode of
compression (alone or with the user turn; during decoding or not) and a `Remedy`. flags.py
builds the settings from the command line, experiment.py runs them, summary.json keeps each
one's fields (`fields()`) under its label, and report.py reads those fields back
(`Setting.from_fields`). The label ("snapkv[window=32]@adakv[alpha=0.1]|whitelist") names a
setting for people: in tables, legends and record keys. Nothing parses it back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

QUERY_AWARE = "+query-aware"            # ends the first half of a query-aware setting's label: "snapkv+query-aware|none"


@dataclass(frozen=True)
class Remedy:
    """What a setting does against eviction bias, on top of its policy."""
    name: str = "none"                           # the label's second half: "none", "whitelist", "fair", ...
    whitelist: list[str] = field(default_factory=list)   # phrases never evicted; "defense" = the defense's own
    fair: str = "none"                           # fair eviction: "none", "defense" or "instructions"
    debias: float = 1.0
    protect: int = 0                             # keep the first and last N tokens of every part (system_parts)


@dataclass(frozen=True)
class Setting:
    """A policy and its options, an allocation and its options, the compression mode, and a remedy."""
    policy: str
    options: dict = field(default_factory=dict)
    remedy: Remedy = Remedy()
    allocation: str = "uniform"
    allocation_options: dict = field(default_factory=dict)
    query_aware: bool = False                    # compressed with the user turn that follows (--query-aware)
    decode_target: int | None = None             # compression during decoding: entries per KV head, or None (off)
    decode_interval: int | None = None           # with a decode target: decode steps between two cuts
    decode_buffer: int | None = None             # with a decode target: queries of the last B tokens a cut reads
    rerotate: bool = False                       # with a decode target: re-rotate the kept keys after each cut

    @property
    def compression_label(self) -> str:
        """The label's first half: "snapkv"; "snapkv[window=32]" with options; "snapkv@adakv" or
        "snapkv@adakv[alpha=0.1]" with an allocation; "snapkv~decode64" with compression during decoding;
        "snapkv+query-aware" compressed with the user turn."""
        name = self.policy + bracketed(self.options)
        if self.allocation != "uniform":
            name += f"@{self.allocation}{bracketed(self.allocation_options)}"
        if self.decode_target is not None:
            name += f"~decode{self.decode_target}"
        return name + (QUERY_AWARE if self.query_aware else "")

    @property
    def label(self) -> str:
        """The compression and the remedy: "snapkv[window=32]|whitelist"."""
        return f"{self.compression_label}|{self.remedy.name}"

    def fields(self) -> dict:
        """What summary.json keeps of the setting: every field, the remedy's as a dict of its own."""
        return asdict(self)

    @staticmethod
    def from_fields(fields: dict) -> "Setting":
        return Setting(**{**fields, "remedy": Remedy(**fields["remedy"])})


def bracketed(options: dict) -> str:
    """"[kernel=3,window=8]" (sorted by name), or "" without options."""
    shown = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"[{shown}]" if shown else ""
