"""What building a preference set did: rows kept and dropped (and why), truncations, lengths, sources."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataStats:
    rows: int
    kept: int
    prompt_truncated: int
    completion_truncated: int
    dropped: dict[str, int]
    implicit_prompts: bool = False  # prompts were cut from the shared prefix of chosen and rejected
    full_lengths: dict[str, list[int]] = field(default_factory=dict)  # kept pairs' token counts before truncation
    # one per source of a mixture: path, split, available (its rows), rows (those it gave), kept
    sources: list[dict] = field(default_factory=list)
    rendered_apart: int = 0  # kept pairs whose template renders the prompt differently once the answer follows

    def __str__(self) -> str:
        dropped = ", ".join(f"{n} ({why})" for why, n in self.dropped.items()) or "0"
        implicit = "; prompts taken from the shared prefix of chosen and rejected" if self.implicit_prompts else ""
        mixture = "; sources: " + ", ".join(f"{s['path']} {s['rows']} of {s['available']} rows ({s['kept']} kept)"
                                             for s in self.sources) if len(self.sources) > 1 else ""
        apart = (f"; {self.rendered_apart} prompts rendered differently once the answer follows (split as the full "
                 "rendering has them)") if self.rendered_apart else ""
        return (f"{self.kept}/{self.rows} pairs kept; dropped {dropped}; truncated prompts "
                f"{self.prompt_truncated}, truncated completions {self.completion_truncated}{implicit}{mixture}{apart}")
