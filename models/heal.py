"""python -m models.heal TEACHER -o HEALED_DIR --drop LAYERS [--fuse GROUPS] [--minutes M | --steps N] [...]
torchrun --nproc-per-node N -m models.heal TEACHER -o HEALED_DIR ...      (sharded over N GPUs: models.heal_dist)

Healing: distill the attention-dropped / FFN-fused model back toward the original, as the FFN Fusion paper did.
The student is models.fused.drop_and_fuse(teacher, --drop, --fuse) (the same numerics as the ONNX passes), started
from the teacher's weights; every weight trains. Loss per batch: the mean over all positions of
KL(p_teacher || p_student) of the next-token distributions, plus, with --hidden-weight w > 0,
w * |x_student - x_teacher|^2 / |x_teacher|^2 of the residual stream after each fused group (its output must
match the sequential run it replaces; sums over the batch, or over each micro-batch with --micro-batch). AdamW
(betas 0.9, 0.95), linear warm-up over --warmup steps, cosine decay to a tenth of --lr over the --steps (or over the
--minutes when no --steps are given); bf16 autocast on a GPU, where the teacher is held in bf16. --micro-batch R:
forward and backward R rows at a time (gradients accumulated; same loss). --student-dtype bf16: the student's weights,
gradients and AdamW moments in bf16 (half the memory; updates are rounded to bf16). --checkpoint-layers: recompute
each decoder layer in the backward pass (activation checkpointing; default on with more than one process).
--local-steps N: first N steps of blockwise local distillation of each fused group (models.heal_local).

Under torchrun (models.heal_dist) each process takes one GPU and its slice of every --batch (which the number of
processes must divide: the loss is the one-process loss), the student is sharded with FSDP2, the teacher held whole
in bf16 or sharded too with --shard-teacher, and only the main process prints, shows bars and writes files.

Data: the --text files (tokenized with the teacher's tokenizer, cut into --seq windows) and, by default or with
--sample, sequences the teacher samples itself (--temperature, from random first tokens; --pool of them made up
front, models.sampling: a static KV cache, replayed from a CUDA graph on a GPU; shared between runs through
--pool-file; no data set needs to be downloaded). The default pool is what --steps read (steps x batch), at most
16384 sequences on a GPU and 256 on a CPU. Evaluation: --eval-tokens of held-out text (--eval-text,
default the start of CPython's language reference, @pydoc: models.text.pydoc_text), never trained on: when a --text
file is the eval text, its eval windows are cut out of the training set. Reported at every --eval-every steps:
held-out perplexity of the student (and of the teacher once), next-token KL and top-1 agreement against the teacher.

Outputs: HEALED_DIR (models.checkpoint: nemotron-nas config with the teacher's kept keys, configuration code,
safetensors in the teacher's dtype, tokenizer), which models.loaders, exporters.export (ONNX: `python -m
exporters.export HEALED_DIR -o H.onnx`; --runtime genai) and the serving engines read; HEALED_DIR's folder must
exist (exit 2 otherwise); --report: the JSON of the run (curve, settings, tokens, GPU seconds, local distillation).
HEALED_DIR.state/ keeps a resumable state (torch.distributed.checkpoint: weights, optimizer, schedule, step, data
position; sharded under torchrun) every --save-every minutes; --resume continues from it (with any number of
processes). A clean finish removes it unless --keep-state.

As a library: run_heal(HealConfig(teacher, output, drop=..., steps=...)) -> HealResult (the folder, the run's
record, the healed student in torch: export_onnx(result.student, path) writes its ONNX with unpadded widths).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import save_checkpoint, source_dtype
from models.decoder import PuzzleDecoder
from models.fused import drop_and_fuse, parse_changes, planned_groups, without_attention
from models.heal_dist import (
    Ranks,
    all_sum,
    checkpoint_layers,
    from_main,
    full_weights,
    global_ratio,
    launched,
    launched_world,
    load_state,
    my_rows,
    remove_state,
    save_state,
    saved_state,
    shard,
    start,
    stop,
)
from models.heal_local import group_spans, local_distill
from models.loaders import load_model, load_tokenizer
from models.sampling import sample_pool
from models.text import PYDOC, pydoc_text
from passes.support.errors import fail, run_cli
from passes.support.outputs import check_output, check_output_folder, write_json

POOL_CAP = {"cuda": 16384, "cpu": 256}    # default --pool at most: sequences sampled before training starts
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class HealConfig:
    """Every option of `python -m models.heal`, with the CLI's defaults (see the module docstring)."""
    teacher: str                      # the original model: preset, smollm2, HF folder or .gguf
    output: str | Path                # new folder for the healed checkpoint (nemotron-nas); its parent must exist
    drop: str | None = None           # layers whose attention is removed, e.g. "5-7,17-18"
    fuse: str | None = None           # FFN groups fused (ordinals), e.g. "4-6,16-17"
    minutes: float | None = None      # training time budget
    steps: int | None = None          # training steps (default: until `minutes`)
    batch: int = 64                   # global batch: rows per optimizer step, over all processes
    seq: int = 256
    lr: float = 2e-4
    warmup: int = 50
    hidden_weight: float = 0.0        # weight of the residual-stream match after fused groups
    text: tuple[str, ...] = ()        # training text files (PYDOC: CPython's language reference)
    sample: bool = False              # also train on teacher-sampled sequences when `text` is given
    pool: int | None = None           # teacher-sampled sequences (default: pool_size)
    sample_batch: int = 1024
    pool_file: str | None = None      # read the sampled sequences from this file, or sample and write them there
    temperature: float = 1.0          # the teacher's sampling temperature
    eval_text: str = PYDOC
    eval_tokens: int = 2048
    eval_every: int = 100
    save_every: float = 5.0           # minutes between resumable states (0: only at the end)
    resume: bool = False
    keep_state: bool = False          # keep the resumable state after a clean finish
    bf16: bool = True
    micro_batch: int | None = None    # rows per forward/backward in each process (default: its whole slice)
    student_dtype: str = "fp32"       # fp32 | bf16: the student's weights, gradients and AdamW moments
    checkpoint_layers: bool | None = None   # activation checkpointing (default: on with more than one process)
    shard_teacher: bool = False       # under torchrun: shard the teacher with FSDP2 too
    local_steps: int = 0              # blockwise local distillation steps of the fused groups, before the KL
    device: str = field(default_factory=_default_device)
    seed: int = 0
    report: str | None = None         # write the run's JSON here


@dataclass
class HealResult:
    """What run_heal made: the checkpoint folder, the run's record (what --report writes) and the healed student."""
    output: Path                      # the healed nemotron-nas checkpoint folder (padded widths, the teacher's dtype)
    state: Path                       # HEALED_DIR.state/: the resumable state (removed after a clean finish unless kept)
    record: dict                      # curve, settings, data, tokens, seconds, teacher_perplexity, final
    student: PuzzleDecoder | None     # the healed model (CPU, eval mode, FFN widths unpadded); None off the main process
    rank: int = 0                     # this process's rank under torchrun

    @property
    def teacher_perplexity(self) -> float:
        return self.record["teacher_perplexity"]

    @property
    def before(self) -> dict:
        """Held-out perplexity, KL and top-1 of the student before healing (step 0)."""
        return self.record["curve"][0]

    @property
    def after(self) -> dict:
        """Held-out perplexity, KL and top-1 of the healed student (the last step)."""
        return self.record["final"]


# ---------------------------------------------------------------------------------------------- data

def read_text(source: str) -> str:
    """The text of a UTF-8 file, or CPython's language reference for PYDOC (models.text.pydoc_text)."""
    if source == PYDOC:
        return pydoc_text()
    path = Path(source)
    if not path.is_file():
        fail(f"text {source}: no such file")
    return path.read_text(encoding="utf-8", errors="replace")


def tokens_of(text: str, tokenizer, vocab: int) -> np.ndarray:
    """Token ids of the text: the teacher's tokenizer, or UTF-8 bytes folded into the vocabulary without one."""
    if tokenizer is None:
        return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64) % vocab
    import transformers
    transformers.logging.set_verbosity_error()
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def windows(ids: np.ndarray, seq: int) -> torch.Tensor:
    """[rows, seq] int64 windows of the ids (the tail shorter than `seq` is dropped)."""
    rows = len(ids) // seq
    return torch.from_numpy(ids[:rows * seq].reshape(rows, seq).copy())


def pool_size(config: HealConfig, device: torch.device) -> int:
    """--pool, else the sequences --steps read (steps x batch), at most POOL_CAP for the device (the cap alone
    with --minutes): a CPU samples a few thousand tokens a second, a GPU hundreds of thousands."""
    if config.pool is not None:
        return config.pool
    cap = POOL_CAP["cuda" if device.type == "cuda" else "cpu"]
    return min(cap, config.steps * config.batch) if config.steps else cap


def teacher_pool(teacher, config: HealConfig, device, autocast, ranks: Ranks = Ranks()) -> torch.Tensor:
    """The teacher-sampled training sequences; with pool_file, read from it when it exists (several runs share
    one pool), else sampled and written there (renamed into place whole, by the main process)."""
    path = Path(config.pool_file) if config.pool_file else None
    if path is not None and path.is_file():
        pool = torch.load(path)
        if pool.dim() != 2 or pool.shape[1] != config.seq or pool.dtype != torch.int64:
            fail(f"--pool-file {path} holds {tuple(pool.shape)} {pool.dtype} sequences, not [N, {config.seq}] int64")
        return pool
    pool = sample_pool(teacher, pool_size(config, device), config.seq, device, config.sample_batch, config.seed,
                       autocast, temperature=config.temperature, ranks=ranks)
    if path is not None and ranks.main:
        torch.save(pool, path.with_name(path.name + ".tmp"))
        path.with_name(path.name + ".tmp").replace(path)
    return pool


# ---------------------------------------------------------------------------------------------- training

def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(student)), in float32."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


EVAL_ROWS = 4     # held-out rows per forward pass


@torch.no_grad()
def reference_logprobs(teacher, eval_ids: torch.Tensor, device, autocast) -> list[torch.Tensor]:
    """The teacher's next-token log-probabilities on the held-out rows (float32, on the CPU), computed once."""
    out = []
    for row in eval_ids.split(EVAL_ROWS):
        with autocast():
            out.append(F.log_softmax(teacher(row.to(device)).float(), -1).cpu())
    return out


def perplexity(logprobs: list[torch.Tensor], eval_ids: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of each next held-out token."""
    nll = sum(-lp[:, :-1].gather(-1, row[:, 1:, None]).sum().item() for lp, row in zip(logprobs, eval_ids.split(EVAL_ROWS)))
    return math.exp(nll / eval_ids[:, 1:].numel())


def group_outputs(model, layers: list[int], store: dict) -> list:
    """Forward hooks that keep the residual stream after each of `layers` in store[layer]."""
    return [model.layers[i].register_forward_hook(lambda _m, _a, out, i=i: store.__setitem__(i, out)) for i in layers]


def lr_at(step: int, progress: float, warmup: int, lr: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to lr / 10 as `progress` (of the steps or of the
    time budget) goes from 0 to 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class Trainer:
    """What one optimizer step needs: the frozen teacher, the trainable student and its optimizer, the loss."""
    teacher: PuzzleDecoder
    student: PuzzleDecoder
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast: object
    ranks: Ranks
    micro_batch: int | None = None
    hidden_weight: float = 0.0
    boundaries: list = field(default_factory=list)     # layers after which the residual streams are matched
    hooks: list = field(default_factory=list)
    student_out: dict = field(default_factory=dict)
    teacher_out: dict = field(default_factory=dict)


def place_teacher(teacher: PuzzleDecoder, config: HealConfig, device: torch.device, ranks: Ranks) -> PuzzleDecoder:
    """The teacher on the device: bf16 on a GPU (with config.bf16), FSDP-sharded with config.shard_teacher."""
    if device.type == "cuda" and config.bf16:
        teacher = teacher.to(torch.bfloat16)
    if config.shard_teacher:
        shard(teacher, device, config.bf16)
        return teacher
    return teacher.to(device)


def build_trainer(config: HealConfig, teacher, student, boundaries: list[int], device, ranks: Ranks) -> Trainer:
    """The student on the device (FSDP2-sharded under torchrun, activation checkpointing as configured), AdamW,
    and the residual-stream hooks after `boundaries` when config.hidden_weight > 0."""
    if ranks.sharded:
        shard(student, device, config.bf16)
    else:
        student.to(device)
    if config.checkpoint_layers if config.checkpoint_layers is not None else ranks.world > 1:
        checkpoint_layers(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    trainer = Trainer(teacher, student.train(), optimizer, device, _autocast(device, config.bf16), ranks,
                      config.micro_batch, config.hidden_weight, boundaries)
    if config.hidden_weight > 0 and boundaries:
        trainer.hooks = group_outputs(student, boundaries, trainer.student_out) + \
            group_outputs(teacher, boundaries, trainer.teacher_out)
    return trainer


def _loss(trainer: Trainer, batch: torch.Tensor) -> torch.Tensor:
    """KL to the teacher on `batch`, plus the weighted residual-stream match after each fused group."""
    with torch.no_grad():
        target = trainer.teacher(batch)
    loss = kl_loss(target, trainer.student(batch))
    if trainer.hooks:
        loss = loss + trainer.hidden_weight * sum(
            global_ratio((trainer.student_out[i].float() - trainer.teacher_out[i].float()).pow(2).sum(),
                         trainer.teacher_out[i].float().pow(2).sum()) for i in trainer.boundaries)
    return loss


def train_step(trainer: Trainer, batch: torch.Tensor, lr: float) -> float:
    """One optimizer step at learning rate `lr` on the global `batch` [rows, seq] (this process trains on its
    slice, micro_batch rows at a time, gradients clipped to norm 1); returns the loss over the whole batch."""
    rows = my_rows(batch, trainer.ranks)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    trainer.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=trainer.device)
    for part in rows.split(trainer.micro_batch or len(rows)):
        with trainer.autocast():
            loss = _loss(trainer, part.to(trainer.device)) * (len(part) / len(rows))
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(trainer.student.parameters(), 1.0)
    trainer.optimizer.step()
    return all_sum(total).item() / trainer.ranks.world


# ---------------------------------------------------------------------------------------------- the run

def check_config(config: HealConfig) -> None:
    """Refuse (UserError) a config that cannot heal, before any work: no budget, no change, an output that is not
    a new or empty folder in an existing folder, a report or pool file in a missing folder, eval tokens that are
    not whole windows, settings out of range."""
    if not config.minutes and not config.steps:
        fail("give --minutes or --steps (the training budget)")
    if not config.drop and not config.fuse:
        fail("give --drop and/or --fuse: healing needs a changed student")
    if config.local_steps and not config.fuse:
        fail("--local-steps trains the fused groups: give --fuse")
    for name in ("batch", "seq", "micro_batch", "pool", "sample_batch", "eval_every"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if config.temperature <= 0 or config.local_steps < 0:
        fail("--temperature must be positive and --local-steps at least 0")
    if config.student_dtype not in DTYPES:
        fail(f"--student-dtype {config.student_dtype}: choose from {', '.join(DTYPES)}")
    world = launched_world()
    if config.batch % world:
        fail(f"--batch {config.batch} must be a multiple of the {world} processes")
    if config.shard_teacher and not launched():
        fail("--shard-teacher shards over the processes of torchrun --nproc-per-node N; run under torchrun")
    check_output_folder(Path(config.output))
    if config.report:
        check_output(Path(config.report), "--report")
    if config.pool_file and not Path(config.pool_file).is_file():
        check_output(Path(config.pool_file), "--pool-file")
    if config.eval_tokens % config.seq:
        fail(f"--eval-tokens {config.eval_tokens} must be a multiple of --seq {config.seq}")


@dataclass
class _Run:
    """One healing run: its trainer, data and progress (what the state keeps: step, position, trained_s, order)."""
    config: HealConfig
    trainer: Trainer
    tokenizer: object
    data: torch.Tensor
    eval_ids: torch.Tensor
    reference: list
    record: dict
    step: int = 0
    position: int = 0
    trained_s: float = 0.0
    order: torch.Tensor | None = None

    @property
    def state_dir(self) -> Path:
        return state_folder(self.config)

    @property
    def ranks(self) -> Ranks:
        return self.trainer.ranks


def state_folder(config: HealConfig) -> Path:
    """HEALED_DIR.state: the resumable state, beside the output."""
    return Path(f"{config.output}.state")


def _autocast(device: torch.device, bf16: bool):
    """bf16 autocast on a GPU (when asked), else a disabled CPU autocast."""
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def _models(config: HealConfig):
    """The frozen teacher and the trainable student (drop_and_fuse, in --student-dtype) on the CPU, the
    tokenizer, dropped layers, groups."""
    teacher = load_model(config.teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dropped, groups = parse_changes(config.drop, config.fuse)
    groups = planned_groups(without_attention(teacher.config, dropped), groups)   # --fuse paper: its groups
    student = drop_and_fuse(teacher, dropped, groups).to(DTYPES[config.student_dtype]).train()
    return teacher, student, load_tokenizer(config.teacher), dropped, groups


def _data(config: HealConfig, teacher, tokenizer, device, autocast, ranks) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(held-out windows, training windows, how many of them the teacher sampled); the held-out tokens never train."""
    vocab = teacher.config.vocab_size
    eval_all = tokens_of(read_text(config.eval_text), tokenizer, vocab)
    if len(eval_all) < config.eval_tokens:
        fail(f"--eval-text has {len(eval_all)} tokens; --eval-tokens {config.eval_tokens} asked")
    eval_ids = windows(eval_all[:config.eval_tokens], config.seq)
    train = []
    for source in config.text:
        ids = tokens_of(read_text(source), tokenizer, vocab)
        if source == config.eval_text:
            ids = ids[config.eval_tokens:]          # the held-out windows never train
        train.append(windows(ids, config.seq))
    sampled = config.sample or not config.text
    if sampled:
        train.append(teacher_pool(teacher, config, device, autocast, ranks))
    return eval_ids, torch.cat(train), int(len(train[-1]) if sampled else 0)


def _new_record(config: HealConfig, dropped, groups, student, data, sampled: int, eval_ids, ranks: Ranks) -> dict:
    """The run's record before training (what --report writes, without the curve and the totals)."""
    return {"teacher": config.teacher, "dropped_layers": dropped, "groups": [list(g) for g in groups],
            "student_layers": [[s.attention, s.ffn_width] for s in student.config.layers],
            "data": {"sequences": int(len(data)), "seq": config.seq, "text": list(config.text), "sampled": sampled,
                     "temperature": config.temperature},
            "eval": {"text": config.eval_text, "tokens": int(eval_ids.numel())},
            "settings": {k: getattr(config, k) for k in ("lr", "warmup", "batch", "seq", "hidden_weight", "seed", "bf16",
                                                         "micro_batch", "student_dtype", "local_steps")},
            "processes": ranks.world, "curve": []}


def _prepare(config: HealConfig) -> _Run:
    """Start the processes, build the models, data and the teacher's reference log-probabilities, run the local
    distillation (not when resuming), shard the student, and restore the progress of a resumed run."""
    ranks, device = start(config.device)
    autocast = _autocast(device, config.bf16)
    torch.manual_seed(config.seed)
    teacher, student, tokenizer, dropped, groups = _models(config)
    teacher = place_teacher(teacher, config, device, ranks)
    eval_ids, data, sampled = _data(config, teacher, tokenizer, device, autocast, ranks)
    record = _new_record(config, dropped, groups, student, data, sampled, eval_ids, ranks)
    reference = reference_logprobs(teacher, eval_ids, device, autocast)
    record["teacher_perplexity"] = perplexity(reference, eval_ids)
    resuming = config.resume and saved_state(state_folder(config)) is not None
    if config.local_steps and not resuming:
        local_warmup = max(1, min(config.warmup, config.local_steps // 10))
        record["local"] = local_distill(
            teacher, student, groups, data, eval_ids, steps=config.local_steps, batch=config.batch,
            micro_batch=config.micro_batch, seed=config.seed, device=device, autocast=autocast, ranks=ranks,
            lr_of=lambda step: lr_at(step, step / config.local_steps, local_warmup, config.lr))
    boundaries = [last for _, last in group_spans(teacher, groups)]   # a fused group's FFN sits at its last layer
    trainer = build_trainer(config, teacher, student, boundaries, device, ranks)
    run = _Run(config, trainer, tokenizer, data, eval_ids, reference, record,
               order=torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed)))
    if resuming:
        progress = load_state(state_folder(config), trainer.student, trainer.optimizer)
        run.step, run.position, run.trained_s = progress["step"], progress["position"], progress["trained_s"]
        run.order = torch.tensor(progress["order"], dtype=torch.int64)
        record["curve"] = progress["curve"]
        if progress.get("local"):
            record["local"] = progress["local"]
    return run


def _evaluate(run: _Run, loss: float | None) -> None:
    """Append the held-out evaluation at the current step to the curve (with the last batch's loss, if any)."""
    trainer = run.trainer
    evaluation = evaluate_pair(trainer.student, run.reference, run.eval_ids, trainer.device, trainer.autocast)
    point = {"step": run.step, "tokens": run.step * run.config.batch * run.config.seq, "seconds": round(run.trained_s, 1)}
    if loss is not None:
        point["loss"] = loss
    run.record["curve"].append({**point, **evaluation})


def _train_step(run: _Run, budget: float) -> float:
    """One optimizer step on the next batch (a new shuffled order when the data runs out); returns its loss."""
    config, t0 = run.config, time.perf_counter()
    if run.position + config.batch > len(run.order):
        run.order = torch.randperm(len(run.data), generator=torch.Generator().manual_seed(config.seed + run.step))
        run.position = 0
    batch = run.data[run.order[run.position:run.position + config.batch]]
    run.position += config.batch
    progress = run.step / config.steps if config.steps else run.trained_s / budget
    loss = train_step(run.trainer, batch, lr_at(run.step, progress, config.warmup, config.lr))
    run.step += 1
    run.trained_s += time.perf_counter() - t0
    return loss


def _train(run: _Run) -> None:
    """Train until --steps or the --minutes budget: evaluate every eval_every steps and at the end, keep the
    resumable state every save_every minutes and at the end with --keep-state. Every process follows the main
    process's clock, so all stop and save at the same step."""
    from tqdm import tqdm
    config = run.config
    total_steps = config.steps or 10**9
    budget = config.minutes * 60 if config.minutes else float("inf")
    if not run.record["curve"]:
        _evaluate(run, None)
    bar = tqdm(total=config.steps or None, desc="healing", unit="step", disable=None if run.ranks.main else True)
    last_save, loss = time.perf_counter(), None
    while run.step < total_steps and run.trained_s < budget:
        loss = _train_step(run, budget)
        due = bool(config.save_every) and time.perf_counter() - last_save > config.save_every * 60
        run.trained_s, due = from_main([run.trained_s, float(due)], run.trainer.device)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", ppl=f"{run.record['curve'][-1]['perplexity']:.2f}")
        if run.step % config.eval_every == 0:
            _evaluate(run, loss)
        if due:
            _save(run)
            last_save = time.perf_counter()
    bar.close()
    for hook in run.trainer.hooks:
        hook.remove()
    if run.record["curve"][-1]["step"] != run.step:
        _evaluate(run, loss)
    if config.keep_state:
        _save(run)


def _save(run: _Run) -> None:
    progress = {"step": run.step, "position": run.position, "trained_s": run.trained_s, "order": run.order.tolist(),
                "curve": run.record["curve"], "local": run.record.get("local")}
    save_state(run.state_dir, run.trainer.student, run.trainer.optimizer, progress, run.ranks)


def _final_student(run: _Run) -> PuzzleDecoder | None:
    """The healed student as a plain model on the CPU (gathered from the shards), in the main process only."""
    weights = full_weights(run.trainer.student)
    if weights is None:
        return None
    with torch.device("meta"):
        student = PuzzleDecoder(run.trainer.student.config)
    student.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, assign=True)
    return student.eval()


def run_heal(config: HealConfig) -> HealResult:
    """Heal: check the config, build the student, train it toward the teacher, write the nemotron-nas checkpoint
    to config.output (and the record to config.report; main process); returns what was made."""
    check_config(config)
    start_s = time.perf_counter()
    try:
        run = _prepare(config)
        _train(run)
        device = run.trainer.device
        run.record.update(steps=run.step, tokens=run.step * config.batch * config.seq,
                          train_seconds=round(run.trained_s, 1), seconds=round(time.perf_counter() - start_s, 1),
                          device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          final=run.record["curve"][-1])
        student = _final_student(run)
        if run.ranks.main:
            save_checkpoint(student, config.output, run.tokenizer, config.teacher, layout="nemotron-nas",
                            dtype=source_dtype(config.teacher))
            if config.report:
                write_json(Path(config.report), run.record)
        if not config.keep_state:
            remove_state(run.state_dir, run.ranks)
    finally:
        stop()
    return HealResult(Path(config.output), run.state_dir, run.record, student, run.ranks.rank)


@torch.no_grad()
def evaluate_pair(student, reference: list[torch.Tensor], eval_ids, device, autocast) -> dict:
    """Held-out perplexity of the student; KL(teacher || student) and top-1 agreement against the teacher's
    log-probabilities `reference` (reference_logprobs) on the same tokens."""
    student.eval()
    logprobs, kl, agree = [], 0.0, 0
    for row, ref in zip(eval_ids.split(EVAL_ROWS), reference):
        with autocast():
            logp = F.log_softmax(student(row.to(device)).float(), -1).cpu()
        logprobs.append(logp)
        kl += (ref.exp() * (ref - logp)).sum().item()
        agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
    student.train()
    return {"perplexity": perplexity(logprobs, eval_ids), "kl": kl / eval_ids.numel(), "top1": agree / eval_ids.numel()}


def parse_config(argv: list[str] | None = None) -> HealConfig:
    """The HealConfig of a `python -m models.heal` command line (argparse errors exit 2)."""
    defaults = {f.name: f.default for f in fields(HealConfig)}
    parser = argparse.ArgumentParser(prog="python -m models.heal", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="the original model: preset, smollm2, HF folder or .gguf")
    parser.add_argument("-o", "--output", required=True, help="new folder for the healed checkpoint (nemotron-nas)")
    parser.add_argument("--drop", help="layers whose attention is removed, e.g. 5-7,17-18,25-26,29")
    parser.add_argument("--fuse", help="FFN groups fused (ordinals), e.g. 4-6,16-17,24-25, or paper (the paper's rule)")
    parser.add_argument("--minutes", type=float, help="training time budget")
    parser.add_argument("--steps", type=int, help="training steps (default: until --minutes)")
    parser.add_argument("--batch", type=int, default=defaults["batch"], help="rows per step, over all processes")
    parser.add_argument("--micro-batch", type=int, help="rows per forward/backward in each process (accumulated)")
    parser.add_argument("--seq", type=int, default=defaults["seq"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--warmup", type=int, default=defaults["warmup"])
    parser.add_argument("--hidden-weight", type=float, default=defaults["hidden_weight"],
                        help="weight of the residual-stream match after groups")
    parser.add_argument("--local-steps", type=int, default=defaults["local_steps"],
                        help="blockwise local distillation steps of the fused groups, before the KL")
    parser.add_argument("--text", nargs="*", default=[], help=f"training text files ({PYDOC}: CPython's language reference)")
    parser.add_argument("--sample", action="store_true", help="also train on teacher-sampled sequences with --text")
    parser.add_argument("--pool", type=int, help="teacher-sampled sequences (default: steps x batch, at most "
                        f"{POOL_CAP['cuda']} on a GPU, {POOL_CAP['cpu']} on a CPU)")
    parser.add_argument("--sample-batch", type=int, default=defaults["sample_batch"])
    parser.add_argument("--pool-file", help="read the sampled sequences from this file, or sample and write them there")
    parser.add_argument("--temperature", type=float, default=defaults["temperature"], help="of the teacher's sampling (above 1: a more diverse pool)")
    parser.add_argument("--eval-text", default=defaults["eval_text"])
    parser.add_argument("--eval-tokens", type=int, default=defaults["eval_tokens"])
    parser.add_argument("--eval-every", type=int, default=defaults["eval_every"])
    parser.add_argument("--save-every", type=float, default=defaults["save_every"],
                        help="minutes between resumable states (0: only at the end)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--keep-state", action="store_true", help="keep HEALED_DIR.state/ after a clean finish")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--student-dtype", choices=tuple(DTYPES), default=defaults["student_dtype"],
                        help="bf16: the student's weights, gradients and AdamW moments in bf16 (half the memory)")
    parser.add_argument("--checkpoint-layers", action=argparse.BooleanOptionalAction,
                        help="activation checkpointing of each decoder layer (default: on with several processes)")
    parser.add_argument("--shard-teacher", action="store_true", help="under torchrun: shard the teacher too (FSDP2)")
    parser.add_argument("--device", default=_default_device())
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--report", help="write the run's JSON here")
    args = vars(parser.parse_args(argv))
    return HealConfig(**{**args, "text": tuple(args["text"])})


def summary(config: HealConfig, result: HealResult) -> list[str]:
    """The lines the CLI prints after a run."""
    record, first, final = result.record, result.before, result.after
    lines = [f"healed {config.teacher} (attention dropped in {config.drop or '-'}, FFN groups {config.fuse or '-'}) "
             f"-> {Path(config.output)}",
             f"  {record['steps']} steps, {record['tokens']:,} tokens, {record['train_seconds']:.0f} s of training on "
             f"{record['device']}" + (f" x {record['processes']} processes" if record["processes"] > 1 else ""),
             f"  held-out perplexity {first['perplexity']:.2f} -> {final['perplexity']:.2f} (teacher "
             f"{result.teacher_perplexity:.2f}); KL vs teacher {first['kl']:.4f} -> {final['kl']:.4f}; "
             f"top-1 {first['top1']:.1%} -> {final['top1']:.1%}"]
    if record.get("local"):
        errors = ", ".join(f"{g['group'][0]}-{g['group'][1]} {g['error_before']:.3f} -> {g['error_after']:.3f}"
                           for g in record["local"]["groups"])
        lines.append(f"  local distillation ({record['local']['steps']} steps), held-out error of each group: {errors}")
    if config.report:
        lines.append(f"  report: {config.report}")
    return lines


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    result = run_heal(config)
    if result.rank == 0:
        print("\n".join(summary(config, result)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
