"""lm-evaluation-harness drives a luca run directory: `LucaLM`, registered as model "luca".

What is notable:
- Importing this module registers the model in lm-eval's registry. lm-eval 0.4 finds models
  only through its own `MODEL_MAPPING` or a `register_model` call made before it looks one up
  (no entry points, and `--include_path` adds tasks, not models), so the `lm_eval` console script
  alone cannot see `luca`. Two ways that work:
      python -m luca.evaluate.lm_eval_adapter --model luca --model_args path=RUN --tasks hellaswag
      luca lm-eval --model luca --model_args path=RUN --tasks hellaswag
  (both run lm-eval's own command line after registering), or from Python:
      import luca.evaluate.lm_eval_adapter; lm_eval.simple_evaluate(model="luca", model_args="path=RUN", ...)
- `lm_eval.models` is imported before registering: lm-eval fills its lazy registry only when the
  registry is empty, so registering first would hide `hf` and the other built-in models.
- `loglikelihood` goes through luca's harness (lm-eval's tokenization rules, shared contexts,
  packing); `loglikelihood_rolling` uses lm-eval's own rolling windows; `generate_until` decodes
  greedily with luca's engine and lm-eval's stop strings.
- model_args: `path` (or `pretrained`), `dtype` (float32 | bfloat16), `device`, `batch_tokens`,
  `max_length`.
"""
from __future__ import annotations

import sys

from luca.errors import LucaError

try:
    import lm_eval.models  # noqa: F401  (fills lm-eval's lazy registry first; see above)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError:  # pragma: no cover - depends on the environment
    raise LucaError("the lm-eval adapter needs lm-eval: pip install 'luca[eval]'") from None


class LucaLM(LM):
    """A luca run directory (or any HF Llama/Qwen2/Qwen3 directory luca loads) as an lm-eval LM."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, dtype: str = "float32",
                 device: str = "cpu", batch_tokens: int | str | None = None, max_length: int | str | None = None,
                 batch_size=None, max_batch_size=None, **_ignored) -> None:
        super().__init__()
        import torch

        from luca import rundir
        run = path or pretrained
        if not run:
            raise LucaError("lm-eval model 'luca' needs model_args path=RUN_DIR")
        dt = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16}.get(str(dtype))
        if dt is None:
            raise LucaError(f"model_args dtype={dtype!r}: use float32 or bfloat16")
        # lm-eval's command line passes --device (default "cuda") to every model; like its hf backend,
        # fall back to the CPU when that device is not there.
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.run_dir = str(run)
        self.model = rundir.load_model(run, device=device, dtype=dt)
        self.tok = rundir.load_tokenizer(run)
        self.max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
        self.batch_tokens = int(batch_tokens) if batch_tokens else None
        self.prefix_token_id = self.tok.im_end_id  # what lm-eval's hf backend uses for luca's tokenizer

    @property
    def tokenizer_name(self) -> str:
        return f"luca:{self.run_dir}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.hf_config()["chat_template"] if chat_template else None

    def _score(self, pairs, groups, disable_tqdm: bool):
        from luca.evaluate.harness import score_pairs
        return score_pairs(self.model, pairs, groups, max_len=self.max_length, batch_tokens=self.batch_tokens,
                           progress=not disable_tqdm, desc="luca loglikelihood")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from luca.evaluate.harness import encode_pairs
        args = [tuple(r.args[:2]) for r in requests]
        # The requests of one document (its choices) share a prefix tree.
        groups = [(getattr(r, "task_name", None), getattr(r, "doc_id", i)) for i, r in enumerate(requests)]
        scored = self._score(encode_pairs(self.tok, args, self.prefix_token_id), groups, disable_tqdm)
        out = []
        for a, s in zip(args, scored):
            out.append((s.ll, s.greedy))
            self.cache_hook.add_partial("loglikelihood", a, (s.ll, s.greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        pairs, owner = [], []
        for i, r in enumerate(requests):
            ids = self.tok.encode(r.args[0])
            for w in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                pairs.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(pairs, list(range(len(pairs))), disable_tqdm) if pairs else []):
            totals[i] += s.ll
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from luca.engine import SamplingConfig, complete
        out = []
        for r in requests:
            ctx, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 256))
            greedy = not kw.get("do_sample", False) or float(kw.get("temperature", 0.0)) == 0.0
            s = SamplingConfig(max_new_tokens=max_new, temperature=0.0 if greedy else float(kw["temperature"]),
                               top_k=0, top_p=float(kw.get("top_p", 1.0)), stop=until)
            ids = self.tok.encode(ctx) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - max_new):]  # lm-eval cuts the prompt from the left too
            text = complete(self.model, self.tok, ids, s).text
            for u in until:  # the engine stops on a stop string; lm-eval also cuts at the first one
                text = text.split(u)[0] if u else text
            out.append(text)
            self.cache_hook.add_partial("generate_until", (ctx, r.args[1]), text)
        return out


# A lazy "module:object" target, so that running this file as __main__ (a second copy of the class)
# and importing it register one and the same class, once.
if "luca" not in model_registry:
    model_registry.register("luca", target="luca.evaluate.lm_eval_adapter:LucaLM")


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with model "luca" registered."""
    from lm_eval.__main__ import cli_evaluate
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
