"""Training from scratch: one loop for a CPU, one GPU, or many GPUs under torchrun.

What is notable:
- The data order is a pure function of (seed, step): sample g of the run is chunk
  perm_epoch[g mod n] of the token shards, with a permutation seeded by (seed, epoch). A resume
  therefore continues the exact stream, and a torchrun job with W ranks splits each global batch
  into the same samples a single process would see (rank r takes its own micro-batches).
- The token batch size `batch_tokens` is reached by gradient accumulation: accum = batch_tokens /
  (micro_batch · seq_len · world). BF16 autocast on CUDA and on CPU (≈2× FP32 on AMX CPUs).
- The step itself (luca/step.py) has no host syncs on a GPU: loss and grad-norm are read back
  only at log steps, and a step with non-finite loss or gradients is skipped on the device,
  counted there, and checked at log and save steps; `max_bad_steps` consecutive ones stop
  training with the last good checkpoint kept. On a CPU (no fused kernel) the check is a host
  read every step, which costs nothing there.
- Speed on a GPU (see benchmarks/bench_train.py): `torch.compile` of the whole model, BF16
  autocast, one GEMM for gate and up, fused AdamW with the clip folded in, FlashAttention through
  SDPA, the head's cross-entropy in luca's own Triton kernel (`loss_impl`, luca/kernels.py), the whole
  step replayed as one CUDA graph on a single GPU (`cuda_graph`), and the next step's
  micro-batches read and pinned by a thread while the GPU works.
- Many processes through torchrun (luca/distributed.py): DDP, or FSDP2 with `fsdp = true`; the
  logged loss is the mean over ranks, metrics are written by rank 0.
- Checkpoints (`train_state/`) hold full FP32 weights and optimizer state keyed by parameter name
  (so a run resumes under another world size or layout), the step and RNG states; they are
  written atomically and verified by checksum on load. `resume=True` continues bitwise on CPU.
- Validation bits-per-byte on a fixed set of validation chunks: summed NLL in bits over the UTF-8
  bytes of the target tokens (end-of-text targets are excluded from both).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from luca import rundir
from luca.atomic import atomic_path, sha256_file, write_text
from luca.distributed import (Dist, all_mean, barrier, full_state, init_distributed, load_full_state, pick_device,
                              unwrap, wrap)
from luca.errors import LucaError
from luca.model import ModelConfig, Transformer
from luca.optim import Muon, adamw, lr_at, muon
from luca.step import BadSteps, Stepper, train_step
from luca.tokenizer import Tokenizer

__all__ = ["TrainConfig", "train", "Dist", "init_distributed", "pick_device", "Batches", "build", "train_step",
           "Stepper"]


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch: int = 16
    batch_tokens: int = 16384
    max_steps: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: share of steps in the final decay
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw | muon (the blocks' matrices; AdamW for the rest: luca/optim.py)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "bf16"  # bf16 (autocast) | fp32
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 250
    log_every: int = 10
    seed: int = 1337
    data_seed: int = -1  # the data order's seed; -1: `seed` (compare fixes it while `seed` varies the init)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_bad_steps: int = 5
    loss_impl: str = "auto"  # auto (fused on CUDA, chunked elsewhere) | fused | full | chunked
    activation_checkpointing: bool = False
    bf16_residual: bool = False  # CUDA: residual stream in BF16 (+3% tok/s; ~2% worse val BPB: README)
    fuse_qkv: bool = True  # CUDA: q, k, v as one GEMM, RoPE's backward in luca's kernel (luca/model.py)
    cuda_graph: bool = True  # one CUDA device: replay the whole step as one CUDA graph (luca/step.py)
    cast_once: bool = True  # one CUDA device, accumulation: weights cast to BF16 once per step, not per micro-batch
    accum_in_gemm: bool = True  # one CUDA device, accumulation: GEMMs add weight gradients into kept buffers
    fold_norms: bool = True  # with cast_once: the blocks' norm weights ride in the cached GEMM weights (luca/model.py)
    fp8_head: bool = False  # FP8-capable CUDA GPUs: the head's GEMMs in FP8 (luca/fp8_head.py); nano-n2 sets it
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    blas_workspace: bool = True  # CUDA: cuBLAS's workspace; nano-n2 turns it off (`no_blas_workspace`: per process)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ValueError(f"schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.fsdp:
            raise ValueError("optimizer = muon needs whole matrices for its Newton-Schulz step: use DDP, not fsdp")
        if self.loss_impl not in ("auto", "fused", "full", "chunked"):
            raise ValueError(f"loss_impl must be auto, fused, full or chunked, got {self.loss_impl!r}")
        for f in ("seq_len", "micro_batch", "batch_tokens", "max_steps", "eval_batches", "log_every"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive")


# -- data order ---------------------------------------------------------------------------------
class Batches:
    """Deterministic (seed, step) → micro-batches over the training shards."""

    def __init__(self, shards, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.n = shards.num_chunks(seq_len)
        if self.n < 1:
            raise LucaError(f"training data has {shards.n_tokens} tokens: fewer than one sequence of {seq_len + 1}")
        self._perm_epoch, self._perm = -1, None

    def sample(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self.shards.chunk(int(self._perm[i]), self.seq_len)

    def micro_batch(self, step: int, micro: int, rank: int, world: int, accum: int, bs: int) -> torch.Tensor:
        per_step = accum * world * bs
        base = step * per_step + (micro * world + rank) * bs
        return torch.from_numpy(np.stack([self.sample(base + j) for j in range(bs)]).astype(np.int64))

    def step_batches(self, step: int, rank: int, world: int, accum: int, bs: int, pin: bool) -> list[torch.Tensor]:
        out = [self.micro_batch(step, m, rank, world, accum, bs) for m in range(accum)]
        return [b.pin_memory() for b in out] if pin else out


class Loader:
    """A step's micro-batches on the device; on CUDA the next step's are read and pinned by a thread
    while the GPU works, and copied without blocking."""

    def __init__(self, batches: Batches, dd: Dist, accum: int, bs: int, device: torch.device):
        self.args = (dd.rank, dd.world, accum, bs, device.type == "cuda")
        self.batches, self.device = batches, device
        self.pool, self.next = None, None
        if device.type == "cuda":
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="luca-data")

    def get(self, step: int, last_step: int) -> list[torch.Tensor]:
        if self.pool is None:
            return self.batches.step_batches(step, *self.args)
        fut = self.next if self.next is not None and self.next[0] == step else \
            (step, self.pool.submit(self.batches.step_batches, step, *self.args))
        cpu = fut[1].result()
        self.next = (step + 1, self.pool.submit(self.batches.step_batches, step + 1, *self.args)) \
            if step + 1 < last_step else None
        return [b.to(self.device, non_blocking=True) for b in cpu]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# -- checkpoints --------------------------------------------------------------------------------
# train_state/ holds state-<step>-<nonce>.pt and meta.json. The state file is written under a
# temporary name, fsynced and renamed; then meta.json (naming it, with its sha256) is replaced
# atomically: that rename is the commit. Older state files are deleted only after it, so a crash at
# any instant leaves meta.json naming a complete file that matches its checksum.
META = "meta.json"


def save_state(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict,
               dd: Dist) -> None:
    """Commit a checkpoint: weights, optimizer state (weights_only-loadable), step and RNG state.

    Every rank calls it (gathering FSDP2 shards is a collective); rank 0 writes."""
    model_sd, optim_sd = full_state(model, opt)
    if dd.main:
        state = {"model": model_sd, "optimizer": optim_sd, "step": step, "cpu_rng": torch.get_rng_state()}
        write_state(run_dir, state, step, {"world": dd.world, **extra})
    barrier(dd)


def write_state(run_dir: Path, state: dict, step: int, extra: dict) -> None:
    """Commit `state` as the checkpoint of `step`. A full disk or an unwritable directory raises
    LucaError and leaves the previous checkpoint as it was."""
    d = Path(run_dir) / rundir.TRAIN_STATE
    name = f"state-{step:08d}-{secrets.token_hex(4)}.pt"  # never the name meta.json holds now
    try:
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / name) as tmp:
            with open(tmp, "wb") as f:
                out = _File(f)
                try:
                    torch.save(state, out)
                except RuntimeError as e:  # torch.save hides a failed write's cause (disk full) in its own error
                    raise out.error or e
            digest = sha256_file(tmp)
        write_text(d / META, json.dumps({"step": step, "sha256": digest, "file": name, **extra}, indent=2))
    except (OSError, RuntimeError) as e:
        with suppress(OSError):
            (d / name).unlink(missing_ok=True)  # renamed but never committed
        raise LucaError(f"{d}: cannot write the checkpoint of step {step} ({_reason(e)}); "
                        f"the previous checkpoint is kept") from None
    with suppress(OSError):  # superseded states, and temporary files a crash left behind
        for p in d.iterdir():
            if p.name != name and (p.name.startswith("state") and p.suffix == ".pt" or p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)


def load_state(run_dir: Path) -> dict | None:
    """The committed checkpoint (None when there is none), verified against its checksum."""
    d = Path(run_dir) / rundir.TRAIN_STATE
    meta_p = d / META
    if not meta_p.is_file():
        return None
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
        name, digest, _ = meta["file"], meta["sha256"], int(meta["step"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise LucaError(f"{meta_p}: damaged (not JSON with step, file and sha256)") from None
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise LucaError(f"{meta_p}: checkpoint file {name!r} is not a file name inside {d}")
    p = d / name
    if not p.is_file() or sha256_file(p) != digest:
        raise LucaError(f"{p}: checkpoint does not match its checksum in {meta_p}; it is damaged")
    try:  # weights_only: tensors and plain containers, never objects (nothing is executed)
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler refuses, the file is not ours
        raise LucaError(f"{p}: not a luca checkpoint ({str(e).strip().splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise LucaError(f"{p}: not a luca checkpoint")
    state["meta"] = meta
    return state


class _File:
    """A file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, where: Path) -> None:
    # Muon's parameter groups carry a "muon" flag; a checkpoint of the other optimizer cannot load.
    saved = "muon" if any("muon" in g for g in state["optimizer"].get("param_groups", [])) else "adamw"
    wanted = "muon" if isinstance(opt, Muon) else "adamw"
    if saved != wanted:
        raise LucaError(f"{where}: the checkpoint was trained with optimizer {saved}, this run asks for {wanted}; "
                        f"resume with --train.optimizer {saved}, or train into a new directory")
    flags = [(g.get("fused"), g.get("foreach"), g.get("capturable")) for g in opt.param_groups]
    # Kept gradients (Transformer.keep_grads) go during the load: torch builds the optimizer's state
    # to load into only where no gradient exists yet, and frees the gradients it made for that.
    kept = [m for m in unwrap(model).modules() if getattr(m, "grads_kept", False)]
    for m in kept:
        m.keep_grads(False)
    if all(isinstance(k, int) for k in state["optimizer"]["state"]):  # an index-keyed checkpoint of luca ≤ 0.1
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    else:
        load_full_state(model, opt, state["model"], state["optimizer"])
    for m in kept:
        m.keep_grads()
    for g, (fused, foreach, capturable) in zip(opt.param_groups, flags):  # this device's kernels, not the saver's
        g["fused"], g["foreach"], g["capturable"] = fused, foreach, capturable


# -- evaluation ---------------------------------------------------------------------------------
def token_byte_lengths(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 byte length of each id; 0 for specials and padding ids (excluded from BPB)."""
    lens = torch.zeros(vocab_size, dtype=torch.int64)
    for i in range(tok.vocab_size):
        if i not in tok.special_ids:
            lens[i] = len(tok.token_bytes(i))
    return lens


@torch.no_grad()
def validation_bpb(model: Transformer, val_shards, seq_len: int, n_batches: int, bs: int,
                   byte_lens: torch.Tensor, device: torch.device, autocast) -> tuple[float, float]:
    """(bits per byte, mean loss in nats) over the first n_batches·bs validation chunks."""
    model.eval()
    n_chunks = val_shards.num_chunks(seq_len)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    idx = 0
    for _ in range(n_batches):
        if idx >= n_chunks:
            break
        rows = [val_shards.chunk(i, seq_len) for i in range(idx, min(idx + bs, n_chunks))]
        idx += len(rows)
        batch = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        nbytes = byte_lens.to(device)[y]
        y = torch.where(nbytes > 0, y, torch.full_like(y, -100))
        with autocast:
            losses = model(x, y, reduction="none")
        total_nats += losses.float().sum().item()
        total_bytes += int(nbytes.sum().item())
        total_tokens += int((y != -100).sum().item())
    model.train()
    if total_bytes == 0:
        return float("nan"), float("nan")
    return total_nats / math.log(2) / total_bytes, total_nats / max(1, total_tokens)


# -- the step -----------------------------------------------------------------------------------
def no_blas_workspace() -> None:
    """Give cuBLAS and cuBLASLt no workspace (unless the environment already sizes it). Without one they
    choose statically scheduled kernels: the dynamically scheduled ones zero a counter in the workspace
    first, a 4-byte memset node before their GEMM in the step's CUDA graph that left the GPU idle ~5 µs
    each, 5 times a layer at nano-n2's shape (0.15 ms of a 21.5 ms micro-batch on an H200, session 14;
    the GEMMs themselves ran as fast). torch reads these once, when a process makes its first cuBLAS
    handle, so this must run before the first GEMM: `build` calls it before the model has run. So it
    holds for the whole process: where one process trains several runs (`luca compare`, the
    pipeline) the first run's setting stands for all. torch's deterministic mode wants a workspace
    (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, which this leaves alone)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")


def build(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, dd: Dist, aux=None):
    """(raw model, the module the loop calls, optimizer) for this device and process group."""
    from luca.auxiliary import build_model  # luca's Transformer or the GPT-2 baseline, with [aux] heads
    if device.type == "cuda" and not cfg.blas_workspace:
        no_blas_workspace()
    torch.manual_seed(cfg.seed)
    raw = build_model(model_cfg, aux)
    raw.reset_parameters(seed=cfg.seed)
    raw.to(device)
    raw.loss_impl = cfg.loss_impl if cfg.loss_impl != "auto" else "fused" if device.type == "cuda" else "chunked"
    if device.type == "cuda" and hasattr(trunk := getattr(raw, "trunk", raw), "set_gpu_training"):
        # one GEMM for gate and up, one for q, k and v (luca/model.py)
        trunk.set_gpu_training(fuse_qkv=cfg.fuse_qkv, bf16_residual=cfg.bf16_residual, fold_norms=cfg.fold_norms,
                               fp8_head=cfg.fp8_head and raw.loss_impl == "fused")
        # BF16 accumulation on one process: work done once per step serves all its micro-batches
        one_accum = cfg.dtype == "bf16" and dd.world == 1 and cfg.batch_tokens > cfg.micro_batch * cfg.seq_len
        if cfg.cast_once and one_accum and hasattr(trunk, "cache_weights"):
            trunk.cache_weights()  # one cast per step (luca/model.py)
        if cfg.accum_in_gemm and one_accum and not cfg.fsdp and hasattr(trunk, "keep_grads"):
            trunk.keep_grads()  # no autograd add per micro-batch and weight (luca/model.py)
    raw.gradient_checkpointing = cfg.activation_checkpointing
    model = wrap(raw, dd, device, cfg.fsdp, cfg.compile)
    if cfg.optimizer == "muon":
        opt = muon(raw, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    else:
        opt = adamw(raw, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type=device.type)
    return raw, model, opt


# -- the loop -----------------------------------------------------------------------------------
def train(run_dir: str | Path, model_cfg: ModelConfig, cfg: TrainConfig, data_dir: str | Path,
          tokenizer: Tokenizer, resume: bool = False, progress: bool = True,
          full_config: dict | None = None, until: int | None = None, aux=None) -> dict:
    """Train `model_cfg` on the token shards in `data_dir`; write the run directory. Returns a summary.

    `aux` (an `auxiliary.AuxConfig` or its dict) adds a training-only objective; the model saved is
    the plain trunk.

    `until` stops after that step as an interruption would (checkpoint written, no final model),
    for training in pieces; `resume=True` then continues to `max_steps`.
    """
    from luca.data import TokenShards, tokenizer_checksum
    run_dir = Path(run_dir)
    device = pick_device(cfg.device)
    dd = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise LucaError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if model_cfg.max_seq_len < cfg.seq_len:
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=cfg.seq_len)
    per_micro = cfg.micro_batch * cfg.seq_len * dd.world
    if cfg.batch_tokens % per_micro:
        raise LucaError(f"train.batch_tokens={cfg.batch_tokens} is not a multiple of micro_batch·seq_len·world "
                        f"= {per_micro}")
    accum = cfg.batch_tokens // per_micro

    train_shards, val_shards = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    if train_shards.tokenizer_checksum != tokenizer_checksum(tokenizer):  # ids would mean other strings
        raise LucaError(f"{data_dir}: its token shards were made with another tokenizer than the one given; "
                        f"run `luca data`/`luca tokenizer` again for this tokenizer")
    data_seed = cfg.seed if cfg.data_seed < 0 else cfg.data_seed
    loader = Loader(Batches(train_shards, cfg.seq_len, data_seed), dd, accum, cfg.micro_batch, device)

    raw_model, model, opt = build(model_cfg, cfg, device, dd, aux)
    say = (lambda msg: _say(progress, msg)) if dd.main else (lambda msg: None)
    start_step, bad_total = 0, 0
    elapsed_before = 0.0
    state = load_state(run_dir) if resume else None
    if resume and state is None:
        say(f"no checkpoint in {run_dir / rundir.TRAIN_STATE}: starting from step 0")
    if state is not None:
        _restore(model, opt, state, run_dir / rundir.TRAIN_STATE)
        torch.set_rng_state(state["cpu_rng"])
        start_step = int(state["step"])
        bad_total = int(state["meta"].get("bad_steps", 0))
        elapsed_before = float(state["meta"].get("elapsed_s", 0.0))
        if dd.main:
            rundir.truncate_metrics(run_dir, start_step)
    elif dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / rundir.METRICS).unlink(missing_ok=True)
    del state
    tokens_before = start_step * cfg.batch_tokens
    if dd.main:
        rundir.save_tokenizer(run_dir, tokenizer)
        if full_config is not None:
            rundir.write_luca_toml(run_dir, full_config)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
    byte_lens = token_byte_lengths(tokenizer, model_cfg.vocab_size)
    eval_model = model if cfg.fsdp and dd.world > 1 else raw_model  # FSDP2 evaluates on all ranks together

    def evaluate():
        return validation_bpb(eval_model, val_shards, cfg.seq_len, cfg.eval_batches, cfg.micro_batch, byte_lens,
                              device, autocast)

    def save(step_done: int) -> None:
        save_state(run_dir, model, opt, step_done, {"bad_steps": bad.total,
                                                     "elapsed_s": elapsed_before + time.perf_counter() - t0}, dd)

    n_params = raw_model.num_parameters()
    # The head's path as it runs (train.fp8_head needs a GPU with FP8 GEMMs; elsewhere the BF16 kernel)
    head = "fp8" if getattr(getattr(raw_model, "trunk", raw_model), "fp8_head", False) else raw_model.loss_impl
    if cfg.fp8_head and head != "fp8":
        say(f"train.fp8_head: not on this device ({device}) or with loss_impl {raw_model.loss_impl!r}: "
            f"the head runs as {head!r}")
    summary = {"parameters": n_params, "non_embedding_parameters": raw_model.num_parameters(True),
               "accum": accum, "world": dd.world, "device": str(device), "head": head}
    bar = StepProgress("train", progress and dd.main, cfg.max_steps, start_step)
    bad = BadSteps(device, cfg.max_bad_steps, bad_total)
    check_every_step = not all(g.get("fused") for g in opt.param_groups)  # skipping already read `ok`
    stepper = Stepper(model, raw_model, opt, cfg.grad_clip, autocast, dd.world, cfg.fsdp, cfg.cuda_graph, say)
    t0 = time.perf_counter()
    t_log, tokens_at_log = t0, 0
    val_bpb = float("nan")
    last_loss = float("nan")
    step = start_step
    model.train()
    try:
        for step in range(start_step, cfg.max_steps):
            lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio,
                       cfg.decay_fraction)
            micro_batches = loader.get(step, cfg.max_steps)
            loss_sum, gnorm, ok = stepper(micro_batches, lr)
            bad.record(ok)
            done = step + 1
            log = done % cfg.log_every == 0 or done == cfg.max_steps
            saving = cfg.save_every > 0 and done % cfg.save_every == 0 and done < cfg.max_steps
            stopping = until is not None and done >= until
            if check_every_step or log or saving or stopping:
                bad.check(done, run_dir, say)
            if log:  # every rank: the loss is averaged over ranks (a collective)
                last_loss = all_mean(loss_sum, dd).item() / accum
                now = time.perf_counter()
                tok_now = (done - start_step) * cfg.batch_tokens
                tps = (tok_now - tokens_at_log) / max(1e-9, now - t_log)
                t_log, tokens_at_log = now, tok_now
                rec = {"step": done, "loss": round(last_loss, 6), "lr": lr, "grad_norm": round(float(gnorm), 6),
                       "tokens": tokens_before + tok_now, "tokens_per_s": round(tps, 1),
                       "elapsed_s": round(elapsed_before + now - t0, 3), "bad_steps": bad.total, "seed": cfg.seed}
                if device.type == "cuda":
                    rec["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                    val_bpb, val_loss = evaluate()
                    rec.update(val_bpb=round(val_bpb, 6), val_loss=round(val_loss, 6))
                if dd.main:
                    rundir.append_metrics(run_dir, rec)
                bar.update(done, rec)
            else:
                bar.update(done, None)
            if saving:
                save(done)
            if stopping:
                save(done)
                return {**summary, "steps": done, "interrupted": True}
        done = cfg.max_steps
    finally:
        bar.close()
        loader.close()
    elapsed = elapsed_before + time.perf_counter() - t0
    save(done)
    if cfg.eval_every <= 0 or not math.isfinite(val_bpb):
        val_bpb, _ = evaluate()
    final = raw_model
    if cfg.fsdp and dd.world > 1:  # gather the shards (a collective) into a plain CPU model on rank 0
        model_sd = full_state(model, opt)[0]
        if dd.main:
            final = Transformer(model_cfg)
            final.load_state_dict(model_sd)
    if dd.main:
        rundir.save_model(run_dir, getattr(final, "trunk", final), tokenizer)  # auxiliary heads stay behind
        summary.update(steps=done, tokens=done * cfg.batch_tokens, time_s=round(elapsed, 2),
                       tokens_per_s=round((done - start_step) * cfg.batch_tokens / max(1e-9, time.perf_counter() - t0), 1),
                       final_train_loss=round(last_loss, 4), val_bpb=round(val_bpb, 4), bad_steps=bad.total)
        if device.type == "cuda":
            summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        write_report(run_dir, summary, model_cfg, cfg)
    barrier(dd)
    return summary


# -- report -------------------------------------------------------------------------------------
def write_report(run_dir: Path, s: dict, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    rows = [("architecture", f"{model_cfg.arch} ({model_cfg.n_layers} layers, d_model {model_cfg.d_model}, "
                             f"{model_cfg.n_heads}/{model_cfg.n_kv_heads} heads)"),
            ("parameters", f"{s['parameters']:,} ({s['non_embedding_parameters']:,} non-embedding)"),
            ("tokens", f"{s['tokens']:,} ({s['steps']} steps × {cfg.batch_tokens:,})"),
            ("time", f"{s['time_s']:.1f} s on {s['device']} × {s['world']}"),
            ("tokens/s", f"{s['tokens_per_s']:,.0f}"),
            ("head's loss", {"fp8": "FP8 GEMMs, luca's kernel", "fused": "luca's kernel", "full": "full logits",
                             "chunked": "chunked"}.get(s.get("head"), "-")),
            ("final train loss", f"{s['final_train_loss']:.4f}"),
            ("validation BPB", f"{s['val_bpb']:.4f}"),
            ("skipped steps", str(s["bad_steps"]))]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    plot = plot_loss(run_dir)
    body = table + (f"\n\n![loss]({rundir.LOSS_PNG})\n" if plot else "\n")
    rundir.update_report_section(run_dir, "Training", body)
    rundir.write_json(run_dir / rundir.TRAIN_SUMMARY, s)


def plot_loss(run_dir: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = rundir.read_metrics(run_dir)
    if not recs:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["tokens"] for r in recs], [r["loss"] for r in recs], label="train loss (nats/token)")
    ev = [r for r in recs if "val_loss" in r]
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-", label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(run_dir / rundir.LOSS_PNG) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


# -- progress -----------------------------------------------------------------------------------
class StepProgress:
    """A rich bar on stderr over optimizer steps, with the last logged loss, rate and validation
    (BPB from `train`, loss from `luca.finetune`); nothing when not enabled."""

    def __init__(self, label: str, enabled: bool, total: int, start: int = 0):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def update(self, done: int, rec: dict | None) -> None:
        if self.bar is None:
            return
        info = None
        if rec is not None:
            info = f"loss {rec['loss']:.3f} · {rec['tokens_per_s']:,.0f} tok/s"
            if "val_bpb" in rec:
                info += f" · val {rec['val_bpb']:.3f} bpb"
            elif "val_loss" in rec:
                info += f" · val {rec['val_loss']:.3f}"
        self.bar.update(self.task, completed=done, **({"info": info} if info else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        from rich.console import Console
        Console(stderr=True).print(msg)
