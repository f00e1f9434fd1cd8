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
default the start of CPython's language reference, @pydoc), never trained on: when a --text file is the eval text,
its eval windows are cut out of the training set. Reported at every --eval-every steps: held-out perplexity of
the student (and of the teacher once), next-token KL and top-1 agreement against the teacher.

Outputs: HEALED_DIR (exporters.checkpoint: nemotron-nas config, safetensors, tokenizer), which models.loaders,
exporters.export (ONNX, --runtime genai) and the serving engines read; with --onnx, the healed model's ONNX too;
--report: the JSON of the run (curve, settings, tokens, GPU seconds). HEALED_DIR.state/ keeps a resumable state
(weights, optimizer, schedule, step, data position) every --save-every minutes; --resume continues from it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.fused import drop_and_fuse, ffn_layers
from models.loaders import load_model, load_tokenizer
from passes.support.errors import fail, run_cli
from passes.support.ranges import expand, parse_ranges

PYDOC = "@pydoc"


# ---------------------------------------------------------------------------------------------- data

def read_text(source: str) -> str:
    if source == PYDOC:
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))
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


def teacher_pool(teacher, args, device, autocast) -> torch.Tensor:
    """The teacher-sampled training sequences; with --pool-file, read from it when it exists (several runs share
    one pool), else sampled and written there (renamed into place whole)."""
    path = Path(args.pool_file) if args.pool_file else None
    if path is not None and path.is_file():
        pool = torch.load(path)
        if pool.dim() != 2 or pool.shape[1] != args.seq or pool.dtype != torch.int64:
            fail(f"--pool-file {path} holds {tuple(pool.shape)} {pool.dtype} sequences, not [N, {args.seq}] int64")
        return pool
    pool = sample_pool(teacher, args.pool, args.seq, device, args.sample_batch, args.seed, autocast)
    if path is not None:
        torch.save(pool, path.with_name(path.name + ".tmp"))
        path.with_name(path.name + ".tmp").replace(path)
    return pool


def heal(args) -> dict:
    start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and args.bf16 else \
        (lambda: torch.autocast("cpu", enabled=False))
    torch.manual_seed(args.seed)
    teacher = load_model(args.teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dropped = expand(parse_ranges(args.drop, "--drop", "5-7,17-18")) if args.drop else []
    groups = parse_ranges(args.fuse, "--fuse", "4-6,16-17") if args.fuse else []
    student = drop_and_fuse(teacher, dropped, groups).to(device).float().train()
    teacher.to(device)
    tokenizer = load_tokenizer(args.teacher)
    vocab = teacher.config.vocab_size

    eval_text = read_text(args.eval_text)
    eval_all = tokens_of(eval_text, tokenizer, vocab)
    if len(eval_all) < args.eval_tokens:
        fail(f"--eval-text has {len(eval_all)} tokens; --eval-tokens {args.eval_tokens} asked")
    eval_ids = windows(eval_all[:args.eval_tokens], args.seq)
    train = []
    for source in args.text:
        ids = tokens_of(read_text(source), tokenizer, vocab)
        if source == args.eval_text:
            ids = ids[args.eval_tokens:]          # the held-out windows never train
        train.append(windows(ids, args.seq))
    if args.sample or not args.text:
        train.append(teacher_pool(teacher, args, device, autocast))
    data = torch.cat(train)
    record = {"teacher": args.teacher, "dropped_layers": dropped, "groups": [list(g) for g in groups],
              "student_layers": [[s.attention, s.ffn_width] for s in student.config.layers],
              "data": {"sequences": int(len(data)), "seq": args.seq, "text": args.text,
                       "sampled": int(len(train[-1]) if (args.sample or not args.text) else 0)},
              "eval": {"text": args.eval_text, "tokens": int(eval_ids.numel())},
              "settings": {k: getattr(args, k) for k in ("lr", "warmup", "batch", "seq", "hidden_weight", "seed", "bf16")},
              "curve": []}
    reference = reference_logprobs(teacher, eval_ids, device, autocast)
    record["teacher_perplexity"] = perplexity(reference, eval_ids)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    state_dir = Path(f"{args.output}.state")
    step, position, trained_s = 0, 0, 0.0
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    if args.resume and (state_dir / "state.pt").is_file():
        saved = torch.load(state_dir / "state.pt", map_location=device)
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        step, position, trained_s, order = saved["step"], saved["position"], saved["trained_s"], saved["order"]
        record["curve"] = saved["curve"]
    boundaries = [ffn_layers(teacher.config)[z] for _, z in groups]   # a fused group's FFN sits at its last layer
    student_out, teacher_out = {}, {}
    hooks = group_outputs(student, boundaries, student_out) + group_outputs(teacher, boundaries, teacher_out) \
        if args.hidden_weight > 0 and boundaries else []
    total_steps = args.steps or 10**9
    budget = args.minutes * 60 if args.minutes else float("inf")
    if not record["curve"]:
        evaluation = evaluate_pair(student, reference, eval_ids, device, autocast)
        record["curve"].append({"step": 0, "tokens": 0, "seconds": 0.0, **evaluation})
    from tqdm import tqdm
    bar = tqdm(total=args.steps or None, desc="healing", unit="step", disable=None)
    last_save = time.perf_counter()
    while step < total_steps and trained_s < budget:
        t0 = time.perf_counter()
        if position + args.batch > len(order):
            order, position = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + step)), 0
        batch = data[order[position:position + args.batch]].to(device)
        position += args.batch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, step / args.steps if args.steps else trained_s / budget, args.warmup, args.lr)
        with autocast():
            with torch.no_grad():
                target = teacher(batch)
            logits = student(batch)
            loss = kl_loss(target, logits)
            if hooks:
                loss = loss + args.hidden_weight * sum(
                    (student_out[i].float() - teacher_out[i].float()).pow(2).sum() / teacher_out[i].float().pow(2).sum()
                    for i in boundaries)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        step += 1
        trained_s += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", ppl=f"{record['curve'][-1]['perplexity']:.2f}")
        if step % args.eval_every == 0:
            evaluation = evaluate_pair(student, reference, eval_ids, device, autocast)
            record["curve"].append({"step": step, "tokens": step * args.batch * args.seq, "seconds": round(trained_s, 1),
                                    "loss": loss.item(), **evaluation})
        if args.save_every and time.perf_counter() - last_save > args.save_every * 60:
            save_state(state_dir, student, optimizer, step, position, trained_s, order, record["curve"])
            last_save = time.perf_counter()
    bar.close()
    for hook in hooks:
        hook.remove()
    if record["curve"][-1]["step"] != step:
        evaluation = evaluate_pair(student, reference, eval_ids, device, autocast)
        record["curve"].append({"step": step, "tokens": step * args.batch * args.seq, "seconds": round(trained_s, 1),
                                "loss": loss.item(), **evaluation})
    save_state(state_dir, student, optimizer, step, position, trained_s, order, record["curve"])
    record.update(steps=step, tokens=step * args.batch * args.seq, train_seconds=round(trained_s, 1),
                  seconds=round(time.perf_counter() - start, 1), device=torch.cuda.get_device_name(device) if cuda else "cpu",
                  final=record["curve"][-1])
    from exporters.checkpoint import save_checkpoint
    student = student.cpu().eval()
    save_checkpoint(student, args.output, tokenizer, layout="nemotron-nas")
    if args.onnx:
        from exporters.export import export_onnx
        export_onnx(student, args.onnx, "fp32")
    return record


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
    """The resumable state, written to a temporary name and renamed (an interrupt leaves the previous one)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "position": position,
                "trained_s": trained_s, "order": order, "curve": curve}, tmp)
    tmp.replace(folder / "state.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.heal", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="the original model: preset, smollm2, HF folder or .gguf")
    parser.add_argument("-o", "--output", required=True, help="new folder for the healed checkpoint (nemotron-nas)")
    parser.add_argument("--drop", help="layers whose attention is removed, e.g. 5-7,17-18,25-26,29")
    parser.add_argument("--fuse", help="FFN groups fused (ordinals), e.g. 4-6,16-17,24-25")
    parser.add_argument("--minutes", type=float, help="training time budget")
    parser.add_argument("--steps", type=int, help="training steps (default: until --minutes)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the residual-stream match after groups")
    parser.add_argument("--text", nargs="*", default=[], help="training text files (@pydoc: CPython's language reference)")
    parser.add_argument("--sample", action="store_true", help="also train on teacher-sampled sequences with --text")
    parser.add_argument("--pool", type=int, default=16384, help="teacher-sampled sequences")
    parser.add_argument("--sample-batch", type=int, default=1024)
    parser.add_argument("--pool-file", help="read the sampled sequences from this file, or sample and write them there")
    parser.add_argument("--eval-text", default=PYDOC)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between resumable states (0: only at the end)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnx", help="also export the healed model to this ONNX file")
    parser.add_argument("--report", help="write the run's JSON here")
    args = parser.parse_args(argv)
    if not args.minutes and not args.steps:
        fail("give --minutes or --steps (the training budget)")
    if not args.drop and not args.fuse:
        fail("give --drop and/or --fuse: healing needs a changed student")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"output {out} exists and is not an empty folder")
    if args.eval_tokens % args.seq:
        fail(f"--eval-tokens {args.eval_tokens} must be a multiple of --seq {args.seq}")
    record = heal(args)
    final = record["final"]
    print(f"healed {args.teacher} (attention dropped in {args.drop or '-'}, FFN groups {args.fuse or '-'}) -> {out}")
    print(f"  {record['steps']} steps, {record['tokens']:,} tokens, {record['train_seconds']:.0f} s of training on {record['device']}")
    first = record["curve"][0]
    print(f"  held-out perplexity {first['perplexity']:.2f} -> {final['perplexity']:.2f} (teacher {record['teacher_perplexity']:.2f}); "
          f"KL vs teacher {first['kl']:.4f} -> {final['kl']:.4f}; top-1 {first['top1']:.1%} -> {final['top1']:.1%}")
    if args.report:
        from passes.support.outputs import write_json
        write_json(Path(args.report), record)
        print(f"  report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
