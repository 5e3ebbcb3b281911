"""lm-evaluation-harness model `yunque`: any yunque model directory under lm-eval's tasks.

    yunque lm-eval --model yunque --model_args pretrained=runs/sft/model --batch_size 8 --tasks hellaswag
    python -c "import yunque.evaluate.lm_eval_adapter, lm_eval; lm_eval.simple_evaluate(model='yunque', ...)"

The batch size is lm-eval's own `--batch_size` (default 1), never a `--model_args` key: lm-eval
hands `--batch_size` to the model itself, so `batch_size` in `--model_args` too fails with
"got multiple values for keyword argument 'batch_size'".

Importing this module registers the model with lm-eval; `yunque lm-eval ARGS` is `lm_eval ARGS`
with this module imported first (lm-eval <= 0.4.13 reads no plugin entry points, so the plain
`lm_eval` command does not see the model).

The request handling mirrors lm-eval's own `hf` model so that the numbers are the same on the
same checkpoint: tokenisation (BOS via the tokenizer's post-processor unless `add_bos_token`
says otherwise), left truncation to `max_length`, disjoint rolling windows for
`loglikelihood_rolling`, greedy `generate_until` cut at the first stop string, and
`--apply_chat_template` through the checkpoint's own template (`yunque.chat`). Scoring goes
through `yunque.evaluate.perplexity.score_continuations`, generation through `yunque.generate`
(batched, KV cache).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models stay registered next to ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from yunque.errors import YunqueError

log = logging.getLogger(__name__)


def _gen_eos(model_dir: Path) -> list[int]:
    p = model_dir / "generation_config.json"
    if not p.is_file():
        return []
    eos = json.loads(p.read_text(encoding="utf-8")).get("eos_token_id")
    return [] if eos is None else eos if isinstance(eos, list) else [eos]


@register_model("yunque")
class YunqueLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        dtype: str | None = None,
        enable_thinking: bool | None = None,
        **_ignored,
    ):
        super().__init__()
        import torch

        from yunque.evaluate.loading import load_for_eval

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype or "")
        self.model, self.tok = load_for_eval(pretrained, adapter, dtype=torch_dtype)
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8 on CPU
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self._prefix = prefix_token_id
        self._stop_ids = [i for i in dict.fromkeys([self.eot_token_id, *_gen_eos(Path(pretrained))]) if i is not None]
        self.pretrained = pretrained
        # Template variables for --apply_chat_template, as lm-eval's `hf` model passes them.
        self.chat_template_args = {} if enable_thinking is None else {"enable_thinking": enable_thinking}

    # -- what lm-eval asks of a model ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template source `--apply_chat_template [NAME]` selects (lm-eval records it with the results)."""
        if chat_template is False or chat_template is None:
            return None
        named = self.tok.chat_templates
        if isinstance(chat_template, str) and len(named) > 1:
            if chat_template not in named:
                raise ValueError(
                    f"The specified chat template '{chat_template}' is not available. "
                    f"Available template names are {sorted(named)}."
                )
            return named[chat_template]
        return self.tok.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as the checkpoint's template writes it; the last message left open to continue it
        when no generation prompt is asked for (as lm-eval's `hf` model does)."""
        from yunque.chat import apply_chat_template

        def render(history):
            return apply_chat_template(
                self.tok,
                history,
                add_generation_prompt,
                continue_final_message=not add_generation_prompt,
                **self.chat_template_args,
            )

        try:
            return render(chat_history)
        except YunqueError:
            # Some templates reject a system turn; lm-eval's `hf` model then drops it and retries.
            without = [m for m in chat_history if m["role"] != "system"]
            if len(without) == len(chat_history):
                raise
            log.warning("Failed to apply chat template. removing the system role in chat history.")
            return render(without)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        special = (
            add_special_tokens
            if add_special_tokens is not None
            else (self.add_bos_token if self.add_bos_token is not None else True)
        )
        bos = self.tok.decode([self.prefix_token_id])
        if add_special_tokens is None and bos and string.startswith(bos):
            special = False  # the text already starts with BOS (e.g. a rendered chat template)
        ids = self.tok.encode(string, add_special_tokens=special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        from yunque.evaluate.perplexity import score_continuations

        pairs = [(ctx, cont) for _, ctx, cont in requests]
        scores = score_continuations(self.model, pairs, override_bs or self._batch_size, self.max_length)
        out = []
        for (key, _, _), s in zip(requests, scores):
            out.append((s.logprob, s.greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for w in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, *w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from yunque.generate import Sampling, generate

        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text not in until:
                until.append(eos_text)
            max_new = int(kw.pop("max_gen_toks", self._max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            s = Sampling(
                max_new_tokens=max_new,
                temperature=temperature if do_sample else 0.0,
                top_p=float(kw.pop("top_p", 1.0) or 1.0),
                top_k=int(kw.pop("top_k", 0) or 0),
                seed=1234,
                stop_ids=tuple(self._stop_ids),
            )
            ctx_len = self.max_length - max_new
            if ctx_len <= 0:
                raise ValueError(f"max_gen_toks {max_new} must be below max_length {self.max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=ctx_len) for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self._batch_size):
                batch = order[start : start + self._batch_size]
                for i, ids in zip(batch, generate(self.model, [prompts[i] for i in batch], s, pad)):
                    text = self.tok_decode([t for t in ids if t not in self._stop_ids])
                    for term in until:
                        if term:
                            text = text.split(term)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
