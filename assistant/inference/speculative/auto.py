"""The ``auto`` drafter: prompt lookup where the text copies, else a model
(the draft model when one is given, or the target's MTP layers)."""

from __future__ import annotations

from assistant.inference.sampling import SamplingParams
from assistant.inference.speculative.drafter import Chooser, Draft
from assistant.inference.speculative.model import ModelDrafter
from assistant.inference.speculative.mtp import MtpDrafter
from assistant.inference.speculative.ngram import NgramDrafter


class AutoDrafter:
    """``auto``: prompt lookup where the text being written copies earlier
    text (and the controller expects it to pay), else ``model``: the draft
    model when one is configured, or the model's MTP layers."""

    def __init__(self, ngram: NgramDrafter, model: ModelDrafter | MtpDrafter | None):
        self.ngram = ngram
        self.model = model
        self.name = f"auto(ngram+{model.name})" if model is not None else "auto(ngram)"

    @property
    def kind(self) -> str | None:
        """The model drafter's kind ("nextn" / "assistant" for MTP), None without one."""
        return getattr(self.model, "kind", None)

    @property
    def needs_costs(self) -> bool:
        return self.model is not None

    def token_cost(self, cls: str, plain_step: float) -> float:
        """The model's drafts cost its steps; prompt lookup's are free."""
        if self.model is not None and cls == self.model.name:
            return self.model.token_cost(cls, plain_step)
        return 0.0

    def begin(self, tokens: list[int], params: SamplingParams) -> None:
        self.ngram.begin(tokens, params)
        if self.model is not None:
            self.model.begin(tokens, params)

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        d = self.ngram.propose(tokens, choose)
        if d is not None or self.model is None:
            return d
        return self.model.propose(tokens, choose)

    def close(self) -> None:
        self.ngram.close()
        if self.model is not None:
            self.model.close()
