"""python -m models.heal TEACHER -o HEALED_DIR --drop LAYERS [--fuse GROUPS] [--minutes M | --steps N] [...]

Healing: distill the attention-dropped / FFN-fused model back toward the original, as the FFN Fusion paper did.
The student is models.fused.drop_and_fuse(teacher, --drop, --fuse) (the same numerics as the ONNX passes), started
from the teacher's weights; every weight trains. Loss per batch: the mean over all positions of
KL(p_teacher || p_student) of the next-token distributions, plus, with --hidden-weight w > 0,
w * |x_student - x_teacher|^2 / |x_teacher|^2 of the residual stream after each fused group (its output must
match the sequential run it replaces). AdamW (betas 0.9, 0.95), linear warm-up over --warmup steps, cosine decay
to a tenth of --lr over the --steps (or over the --minutes when no --steps are given); bf16 autocast on a GPU.

Data: the --text files (tokenized with the teacher's tokenizer, cut into --seq windows) and, by default or with
--sample, sequences the teacher samples itself (temperature 1, from random first tokens, --pool of them made up
front with a KV cache, shared between runs through --pool-file; no data set needs to be downloaded). Evaluation: --eval-tokens of held-out text (--eval-text,
default the start of CPython's language reference, @pydoc: models.text.pydoc_text), never trained on: when a --text
file is the eval text, its eval windows are cut out of the training set. Reported at every --eval-every steps:
held-out perplexity of the student (and of the teacher once), next-token KL and top-1 agreement against the teacher.

Outputs: HEALED_DIR (models.checkpoint: nemotron-nas config with the teacher's kept keys, configuration code,
safetensors in the teacher's dtype (training runs in float32, bf16 autocast on a GPU), tokenizer), which models.loaders,
exporters.export (ONNX: `python -m exporters.export HEALED_DIR -o H.onnx`; --runtime genai) and the serving engines
read; HEALED_DIR's folder must exist (exit 2 otherwise); --report: the JSON of the run (curve, settings, tokens, GPU
seconds). HEALED_DIR.state/ keeps a resumable state (weights, optimizer, schedule, step, data position) every
--save-every minutes; --resume continues from it.

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
from models.fused import drop_and_fuse, ffn_layers, parse_changes
from models.loaders import load_model, load_tokenizer
from models.text import PYDOC, pydoc_text
from passes.support.errors import fail, run_cli
from passes.support.outputs import check_output, check_output_folder, write_json


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
    batch: int = 64
    seq: int = 256
    lr: float = 2e-4
    warmup: int = 50
    hidden_weight: float = 0.0        # weight of the residual-stream match after fused groups
    text: tuple[str, ...] = ()        # training text files (PYDOC: CPython's language reference)
    sample: bool = False              # also train on teacher-sampled sequences when `text` is given
    pool: int = 16384                 # teacher-sampled sequences
    sample_batch: int = 1024
    pool_file: str | None = None      # read the sampled sequences from this file, or sample and write them there
    eval_text: str = PYDOC
    eval_tokens: int = 2048
    eval_every: int = 100
    save_every: float = 5.0           # minutes between resumable states (0: only at the end)
    resume: bool = False
    bf16: bool = True
    device: str = field(default_factory=_default_device)
    seed: int = 0
    report: str | None = None         # write the run's JSON here


@dataclass
class HealResult:
    """What run_heal made: the checkpoint folder, the run's record (what --report writes) and the healed student."""
    output: Path                      # the healed nemotron-nas checkpoint folder (padded widths, the teacher's dtype)
    state: Path                       # HEALED_DIR.state/: the resumable state
    record: dict                      # curve, settings, data, tokens, seconds, teacher_perplexity, final
    student: PuzzleDecoder            # the healed model (CPU, eval mode, FFN widths unpadded)

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


@torch.no_grad()
def sample_pool(teacher, count: int, seq: int, device, batch: int, seed: int, autocast) -> torch.Tensor:
    """`count` sequences of `seq` tokens the teacher samples (temperature 1) from random first tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = teacher.config.vocab_size
    rows = []
    for start in range(0, count, batch):
        b = min(batch, count - start)
        ids = torch.randint(0, vocab, (b, 1), generator=gen, device=device)
        config = teacher.config
        past = [(torch.zeros(b, config.kv_heads(i), 0, config.head_dim, device=device, dtype=next(teacher.parameters()).dtype),) * 2
                for i in teacher.attention_layers]
        out, step = [ids], ids
        with autocast():
            for _ in range(seq - 1):
                logits, past = teacher.forward_step(step, past)
                probs = torch.softmax(logits[:, -1].float(), -1)
                step = torch.multinomial(probs, 1, generator=gen)
                out.append(step)
        rows.append(torch.cat(out, 1).cpu())
    return torch.cat(rows)


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


def teacher_pool(teacher, config: HealConfig, device, autocast) -> torch.Tensor:
    """The teacher-sampled training sequences; with pool_file, read from it when it exists (several runs share
    one pool), else sampled and written there (renamed into place whole)."""
    path = Path(config.pool_file) if config.pool_file else None
    if path is not None and path.is_file():
        pool = torch.load(path)
        if pool.dim() != 2 or pool.shape[1] != config.seq or pool.dtype != torch.int64:
            fail(f"--pool-file {path} holds {tuple(pool.shape)} {pool.dtype} sequences, not [N, {config.seq}] int64")
        return pool
    pool = sample_pool(teacher, config.pool, config.seq, device, config.sample_batch, config.seed, autocast)
    if path is not None:
        torch.save(pool, path.with_name(path.name + ".tmp"))
        path.with_name(path.name + ".tmp").replace(path)
    return pool


# ---------------------------------------------------------------------------------------------- the run

def check_config(config: HealConfig) -> None:
    """Refuse (UserError) a config that cannot heal, before any work: no budget, no change, an output that is not
    a new or empty folder in an existing folder, a report or pool file in a missing folder, eval tokens that are
    not whole windows."""
    if not config.minutes and not config.steps:
        fail("give --minutes or --steps (the training budget)")
    if not config.drop and not config.fuse:
        fail("give --drop and/or --fuse: healing needs a changed student")
    check_output_folder(Path(config.output))
    if config.report:
        check_output(Path(config.report), "--report")
    if config.pool_file and not Path(config.pool_file).is_file():
        check_output(Path(config.pool_file), "--pool-file")
    if config.eval_tokens % config.seq:
        fail(f"--eval-tokens {config.eval_tokens} must be a multiple of --seq {config.seq}")


@dataclass
class _Run:
    """One healing run's models, data and progress (what the state file keeps: step, position, trained_s, order)."""
    config: HealConfig
    device: torch.device
    autocast: object
    teacher: PuzzleDecoder
    student: PuzzleDecoder
    tokenizer: object
    data: torch.Tensor
    eval_ids: torch.Tensor
    reference: list
    optimizer: torch.optim.Optimizer
    record: dict
    step: int = 0
    position: int = 0
    trained_s: float = 0.0
    order: torch.Tensor | None = None
    boundaries: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    student_out: dict = field(default_factory=dict)
    teacher_out: dict = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return Path(f"{self.config.output}.state")


def _autocast(device: torch.device, bf16: bool):
    """bf16 autocast on a GPU (when asked), else a disabled CPU autocast."""
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def _models(config: HealConfig, device: torch.device):
    """The frozen teacher, the trainable student (drop_and_fuse, float32), the tokenizer, dropped layers, groups."""
    teacher = load_model(config.teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dropped, groups = parse_changes(config.drop, config.fuse)
    student = drop_and_fuse(teacher, dropped, groups).to(device).float().train()
    teacher.to(device)
    return teacher, student, load_tokenizer(config.teacher), dropped, groups


def _data(config: HealConfig, teacher, tokenizer, device, autocast) -> tuple[torch.Tensor, torch.Tensor, int]:
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
        train.append(teacher_pool(teacher, config, device, autocast))
    return eval_ids, torch.cat(train), int(len(train[-1]) if sampled else 0)


def _new_record(config: HealConfig, dropped, groups, student, data, sampled: int, eval_ids) -> dict:
    """The run's record before training (what --report writes, without the curve and the totals)."""
    return {"teacher": config.teacher, "dropped_layers": dropped, "groups": [list(g) for g in groups],
            "student_layers": [[s.attention, s.ffn_width] for s in student.config.layers],
            "data": {"sequences": int(len(data)), "seq": config.seq, "text": list(config.text), "sampled": sampled},
            "eval": {"text": config.eval_text, "tokens": int(eval_ids.numel())},
            "settings": {k: getattr(config, k) for k in ("lr", "warmup", "batch", "seq", "hidden_weight", "seed", "bf16")},
            "curve": []}


def _prepare(config: HealConfig) -> _Run:
    """Models, data, the teacher's reference log-probabilities, the optimizer, and the progress of a resumed run."""
    device = torch.device(config.device)
    autocast = _autocast(device, config.bf16)
    torch.manual_seed(config.seed)
    teacher, student, tokenizer, dropped, groups = _models(config, device)
    eval_ids, data, sampled = _data(config, teacher, tokenizer, device, autocast)
    record = _new_record(config, dropped, groups, student, data, sampled, eval_ids)
    reference = reference_logprobs(teacher, eval_ids, device, autocast)
    record["teacher_perplexity"] = perplexity(reference, eval_ids)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    run = _Run(config, device, autocast, teacher, student, tokenizer, data, eval_ids, reference, optimizer, record,
               order=torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed)))
    if config.resume and (run.state_dir / "state.pt").is_file():
        saved = torch.load(run.state_dir / "state.pt", map_location=device)
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        run.step, run.position, run.trained_s, run.order = saved["step"], saved["position"], saved["trained_s"], saved["order"]
        record["curve"] = saved["curve"]
    run.boundaries = [ffn_layers(teacher.config)[z] for _, z in groups]   # a fused group's FFN sits at its last layer
    if config.hidden_weight > 0 and run.boundaries:
        run.hooks = group_outputs(student, run.boundaries, run.student_out) + \
            group_outputs(teacher, run.boundaries, run.teacher_out)
    return run


def _evaluate(run: _Run, loss: torch.Tensor | None) -> None:
    """Append the held-out evaluation at the current step to the curve (with the last batch's loss, if any)."""
    evaluation = evaluate_pair(run.student, run.reference, run.eval_ids, run.device, run.autocast)
    point = {"step": run.step, "tokens": run.step * run.config.batch * run.config.seq, "seconds": round(run.trained_s, 1)}
    if loss is not None:
        point["loss"] = loss.item()
    run.record["curve"].append({**point, **evaluation})


def _loss(run: _Run, batch: torch.Tensor) -> torch.Tensor:
    """KL to the teacher on `batch`, plus the weighted residual-stream match after each fused group."""
    with torch.no_grad():
        target = run.teacher(batch)
    loss = kl_loss(target, run.student(batch))
    if run.hooks:
        loss = loss + run.config.hidden_weight * sum(
            (run.student_out[i].float() - run.teacher_out[i].float()).pow(2).sum() / run.teacher_out[i].float().pow(2).sum()
            for i in run.boundaries)
    return loss


def _train_step(run: _Run, budget: float) -> torch.Tensor:
    """One optimizer step on the next batch (a new shuffled order when the data runs out); returns its loss."""
    config, t0 = run.config, time.perf_counter()
    if run.position + config.batch > len(run.order):
        run.order = torch.randperm(len(run.data), generator=torch.Generator().manual_seed(config.seed + run.step))
        run.position = 0
    batch = run.data[run.order[run.position:run.position + config.batch]].to(run.device)
    run.position += config.batch
    progress = run.step / config.steps if config.steps else run.trained_s / budget
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, progress, config.warmup, config.lr)
    with run.autocast():
        loss = _loss(run, batch)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.student.parameters(), 1.0)
    run.optimizer.step()
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    run.step += 1
    run.trained_s += time.perf_counter() - t0
    return loss


def _train(run: _Run) -> None:
    """Train until --steps or the --minutes budget: evaluate every eval_every steps and at the end, keep the
    resumable state every save_every minutes and at the end."""
    from tqdm import tqdm
    config = run.config
    total_steps = config.steps or 10**9
    budget = config.minutes * 60 if config.minutes else float("inf")
    if not run.record["curve"]:
        _evaluate(run, None)
    bar = tqdm(total=config.steps or None, desc="healing", unit="step", disable=None)
    last_save, loss = time.perf_counter(), None
    while run.step < total_steps and run.trained_s < budget:
        loss = _train_step(run, budget)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", ppl=f"{run.record['curve'][-1]['perplexity']:.2f}")
        if run.step % config.eval_every == 0:
            _evaluate(run, loss)
        if config.save_every and time.perf_counter() - last_save > config.save_every * 60:
            _save(run)
            last_save = time.perf_counter()
    bar.close()
    for hook in run.hooks:
        hook.remove()
    if run.record["curve"][-1]["step"] != run.step:
        _evaluate(run, loss)
    _save(run)


def _save(run: _Run) -> None:
    save_state(run.state_dir, run.student, run.optimizer, run.step, run.position, run.trained_s, run.order,
               run.record["curve"])


def run_heal(config: HealConfig) -> HealResult:
    """Heal: check the config, build the student, train it toward the teacher, write the nemotron-nas checkpoint
    to config.output (and the record to config.report); returns what was made."""
    check_config(config)
    start = time.perf_counter()
    run = _prepare(config)
    _train(run)
    cuda = run.device.type == "cuda"
    run.record.update(steps=run.step, tokens=run.step * config.batch * config.seq, train_seconds=round(run.trained_s, 1),
                      seconds=round(time.perf_counter() - start, 1),
                      device=torch.cuda.get_device_name(run.device) if cuda else "cpu", final=run.record["curve"][-1])
    student = run.student.cpu().eval()
    output = save_checkpoint(student, config.output, run.tokenizer, config.teacher, layout="nemotron-nas",
                             dtype=source_dtype(config.teacher))
    if config.report:
        write_json(Path(config.report), run.record)
    return HealResult(output, run.state_dir, run.record, student)


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


def save_state(folder: Path, student, optimizer, step, position, trained_s, order, curve) -> None:
    """The resumable state, written to a temporary name and renamed (an interrupt leaves the previous one). The
    folder sits beside the output, whose parent exists (check_config)."""
    folder.mkdir(exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "position": position,
                "trained_s": trained_s, "order": order, "curve": curve}, tmp)
    tmp.replace(folder / "state.pt")


def parse_config(argv: list[str] | None = None) -> HealConfig:
    """The HealConfig of a `python -m models.heal` command line (argparse errors exit 2)."""
    defaults = {f.name: f.default for f in fields(HealConfig)}
    parser = argparse.ArgumentParser(prog="python -m models.heal", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="the original model: preset, smollm2, HF folder or .gguf")
    parser.add_argument("-o", "--output", required=True, help="new folder for the healed checkpoint (nemotron-nas)")
    parser.add_argument("--drop", help="layers whose attention is removed, e.g. 5-7,17-18,25-26,29")
    parser.add_argument("--fuse", help="FFN groups fused (ordinals), e.g. 4-6,16-17,24-25")
    parser.add_argument("--minutes", type=float, help="training time budget")
    parser.add_argument("--steps", type=int, help="training steps (default: until --minutes)")
    parser.add_argument("--batch", type=int, default=defaults["batch"])
    parser.add_argument("--seq", type=int, default=defaults["seq"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--warmup", type=int, default=defaults["warmup"])
    parser.add_argument("--hidden-weight", type=float, default=defaults["hidden_weight"],
                        help="weight of the residual-stream match after groups")
    parser.add_argument("--text", nargs="*", default=[], help=f"training text files ({PYDOC}: CPython's language reference)")
    parser.add_argument("--sample", action="store_true", help="also train on teacher-sampled sequences with --text")
    parser.add_argument("--pool", type=int, default=defaults["pool"], help="teacher-sampled sequences")
    parser.add_argument("--sample-batch", type=int, default=defaults["sample_batch"])
    parser.add_argument("--pool-file", help="read the sampled sequences from this file, or sample and write them there")
    parser.add_argument("--eval-text", default=defaults["eval_text"])
    parser.add_argument("--eval-tokens", type=int, default=defaults["eval_tokens"])
    parser.add_argument("--eval-every", type=int, default=defaults["eval_every"])
    parser.add_argument("--save-every", type=float, default=defaults["save_every"],
                        help="minutes between resumable states (0: only at the end)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
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
             f"{record['device']}",
             f"  held-out perplexity {first['perplexity']:.2f} -> {final['perplexity']:.2f} (teacher "
             f"{result.teacher_perplexity:.2f}); KL vs teacher {first['kl']:.4f} -> {final['kl']:.4f}; "
             f"top-1 {first['top1']:.1%} -> {final['top1']:.1%}"]
    if config.report:
        lines.append(f"  report: {config.report}")
    return lines


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    result = run_heal(config)
    print("\n".join(summary(config, result)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
