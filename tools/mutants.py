"""Mutation check: break one feature at a time in a copy of the repository and run the tests that claim to cover it.

    python tools/mutants.py                 # every mutation (slow: tens of minutes on 2 cores); `make mutants`
    python tools/mutants.py -k florence2    # the mutations whose name contains "florence2"
    python tools/mutants.py --list          # names, whether each target is found, mapped tests; nothing run
    python tools/mutants.py --baseline      # first check the mapped tests pass on the unmutated copy

Each mutation replaces exact pieces of source text (usually one line; each must occur exactly once in its file) in a
temporary copy of the working tree, runs only the tests mapped to it there (PYTHONPATH=<copy>/src, so `-m captune`
subprocesses run the mutated code too), and restores the files. A mutation is killed when a mapped test fails (pytest
exit code 1); a timeout counts as an error, not a kill. The run
exits non-zero when any mutation survived, when a mutation's target text is missing or ambiguous (code moved: update
the target rather than let the mutation silently test nothing), or when pytest could not run a mapped test (renamed
or deleted: exit codes 2-5). The repository itself is never modified.

Adding a mutation: pick a single stable line of the feature, write what a plausible bug would turn it into, and map
the fastest tests that should notice; name the mutation in the docstring of the test that kills it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    """File relative to the repository root."""
    old: str
    """Exact text replaced; must occur once in `path`."""
    new: str
    tests: tuple[str, ...]
    """pytest node ids (or files) run against the mutated copy."""
    more: tuple[tuple[str, str, str], ...] = ()
    """Further (path, old, new) edits applied with the first: a feature implemented twice breaks only when both go."""

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.path, self.old, self.new), *self.more]


M = Mutation
BLIP, FLORENCE = "src/captune/models/blip.py", "src/captune/models/florence2.py"
GIT, BLIP2 = "src/captune/models/git.py", "src/captune/models/blip2.py"
TRAIN, SERVE = "src/captune/train.py", "src/captune/serve.py"
FLORENCE_LABELS = ("tests/test_florence2.py::"
                   "test_encoder_input_is_the_processors_task_prompt_and_labels_are_decoder_targets")
BLIP2_LABELS = "tests/test_blip2.py::test_labels_mask_placeholders_prompt_padding_and_start_where_generate_starts"
PALI, SMOL = "src/captune/models/paligemma.py", "src/captune/models/smolvlm.py"
PALI_ROWS = "tests/test_paligemma.py::test_rows_equal_the_processors_suffix_rows_and_labels_mask_all_but_the_caption"
PALI_LOSS = "tests/test_paligemma.py::test_loss_equals_the_models_own_and_depends_on_the_image_and_the_prefix_block"
SMOL_LABELS = "tests/test_smolvlm.py::test_labels_are_the_assistant_reply_alone_token_by_token"
OPTIONS_TEST = "tests/test_train_options.py::test_smoothing_augment_normalize_and_pixel_limit_reach_training"

MUTATIONS = [
    # --- the audit of issue 17 ---
    M("blip: first token not swapped to [DEC]", BLIP,
      "    input_ids[:, 0] = tokenizer.bos_token_id\n", "",
      ("tests/test_collate.py::test_first_token_is_bos_as_generate_decodes",)),
    M("blip: pads not -100", BLIP,
      'labels = input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)',
      "labels = input_ids.clone()",
      ("tests/test_collate.py::test_padding_is_minus_100_and_dynamic",)),
    M("blip: prompt not masked", BLIP,
      "labels[:, :prompt_tokens] = IGNORE_INDEX", "labels[:, :1] = IGNORE_INDEX",
      ("tests/test_collate.py::test_prompt_is_masked_out_of_the_loss",)),
    M("blip: pads not -100 (as the notebook shows it)", BLIP,
      'labels = input_ids.masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)',
      "labels = input_ids.clone()",
      ("tests/test_notebook.py",)),
    M("caption_loss: label smoothing forced to 0", "src/captune/models/common.py",
      "label_smoothing=label_smoothing, reduction=\"sum\",", "label_smoothing=0.0, reduction=\"sum\",",
      ("tests/test_collate.py::test_loss_ignores_pads_and_smooths",)),
    M("train loop: label smoothing forced to 0", TRAIN,
      "accelerator, model, vision, window, label_smoothing=t.label_smoothing, seed=t.seed,",
      "accelerator, model, vision, window, label_smoothing=0.0, seed=t.seed,",
      (OPTIONS_TEST,)),
    M("serve: any content type accepted", SERVE,
      'if not (kind.startswith("image/") or kind in GENERIC_TYPES):', "if False:",
      ("tests/test_serve.py::test_a_valid_image_sent_as_text_is_refused",)),
    M("serve: no request size limit", SERVE,
      "    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes, read_timeout_s=limits.read_timeout_s)\n",
      "",
      ("tests/test_serve.py::test_huge_declared_size_is_refused_before_reading",)),
    M("check: always exits 0", "src/captune/cli.py",
      'return 1 if report["errors"] else 0', "return 0",
      ("tests/test_bad_input.py::test_check_names_every_problem",)),
    # Resuming restores the RNG twice over: each micro-batch reseeds from its position (seeding.py), and Accelerate's
    # load_state puts back the RNG states the checkpoint saved. Skipping the reseed alone survived (the restore
    # still made the resume exact); skipping the restore alone cannot matter while every draw is reseeded. So "RNG
    # not restored" skips both.
    M("resume: RNG not restored (position reseed and Accelerate's RNG restore both skipped)", "src/captune/seeding.py",
      'torch.manual_seed(derive_seed(seed, epoch, "micro-batch", batch, process))', "pass",
      ("tests/test_exact_resume.py::test_lora_with_dropout_resumes_exactly",),
      more=(("src/captune/checkpoint.py", "        accelerator.load_state(str(checkpoint))\n",
             "        rng = __import__('torch').get_rng_state()\n        accelerator.load_state(str(checkpoint))\n"
             "        __import__('torch').set_rng_state(rng)\n"),)),
    M("grouped batches stop sharing the ViT pass", "src/captune/data/collate.py",
      "shared = None not in keys and len(set(keys)) < len(keys)", "shared = False",
      ("tests/test_grouped.py::test_train_with_grouped_sampling_end_to_end",)),
    M("SDPA lever installs the eager forward", "src/captune/speed.py",
      "module.forward = types.MethodType(forward, module)", "module.forward = module.forward",
      ("tests/test_speed.py::test_sdpa_kernel_runs_in_forward_backward_and_generate",)),
    M("caption --int8 ignored", "src/captune/cli.py",
      "captioner = Captioner.load(args.model, device=args.device, int8=args.int8)\n    return run_caption(",
      "captioner = Captioner.load(args.model, device=args.device)\n    return run_caption(",
      ("tests/test_int8.py::test_caption_cli_int8_writes_captions",)),
    M("DDP never all-reduces gradients", TRAIN,
      "with (contextlib.nullcontext() if accelerator.sync_gradients else accelerator.no_sync(model),",
      "with (accelerator.no_sync(model),",
      ("tests/test_distributed.py::test_two_processes_batch_4_follow_one_process_batch_8",)),
    M("DDP never all-reduces gradients (BLIP-2, GIT)", TRAIN,
      "with (contextlib.nullcontext() if accelerator.sync_gradients else accelerator.no_sync(model),",
      "with (accelerator.no_sync(model),",
      ("tests/test_distributed.py::test_other_families_train_under_two_processes_as_under_one",)),
    M("eval sampling flags dropped (--top-p, --temperature)", "src/captune/cli.py",
      "do_sample=args.sample, top_p=args.top_p, temperature=args.temperature,", "do_sample=args.sample,",
      ("tests/test_eval_cli.py::test_generation_flags_reach_generate",)),
    M("eval --repetition-penalty dropped by the CLI", "src/captune/cli.py",
      'for name, default in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0),',
      'for name, default in (("no_repeat_ngram_size", 0),',
      ("tests/test_eval_cli.py::test_generation_flags_reach_generate",)),
    M("repetition penalty never passed to generate()", "src/captune/generate.py",
      '        kwargs.pop("prompt")\n', '        kwargs.pop("prompt")\n        kwargs.pop("repetition_penalty")\n',
      ("tests/test_eval_cli.py::test_repetition_penalty_changes_what_a_repeating_model_writes",)),
    M("report metric columns swapped", "src/captune/report.py",
      'cells = "".join(f"<td>{_fmt(c.get(key))}</td>" for c in columns.values())',
      'cells = "".join(f"<td>{_fmt(c.get(key))}</td>" for c in reversed(columns.values()))',
      ("tests/test_report.py::test_metric_table_holds_the_runs_numbers_and_each_card_its_own_captions",)),
    M("report cards show the after caption as the before one", "src/captune/report.py",
      '(("before", labels[0], before), ("after", labels[1], after))',
      '(("before", labels[0], after), ("after", labels[1], after))',
      ("tests/test_report.py::test_metric_table_holds_the_runs_numbers_and_each_card_its_own_captions",)),
    M("ROUGE-L against the first reference only", "src/captune/metrics.py",
      "rouge, _ = Rouge().compute_score(gts, res)",
      "rouge, _ = Rouge().compute_score({i: gts[i][:1] for i in gts}, res)",
      ("tests/test_metrics.py::test_fallback_pinned_values_on_fixed_set",)),
    M("data.max_image_pixels ignored in training", TRAIN,
      "options = ItemOptions(max_pixels=cfg.data.max_image_pixels, draft_size=size,",
      "options = ItemOptions(max_pixels=10**12, draft_size=size,",
      (OPTIONS_TEST,)),
    M("data.augment never applied in training", TRAIN,
      "augment_size=size if cfg.data.augment\n", "augment_size=0 if cfg.data.augment\n",
      (OPTIONS_TEST,)),
    M("data.normalize_captions never applied in training", TRAIN,
      "normalize_captions=cfg.data.normalize_captions, max_words=cfg.data.max_words)\n    if cfg.train.objective",
      "normalize_captions=False, max_words=cfg.data.max_words)\n    if cfg.train.objective",
      (OPTIONS_TEST,)),
    # --- per model family: first decoding token, padding / prompt / image tokens kept out of the loss ---
    # BLIP's first token, pads and prompt are the audit's rows above. BLIP and Florence-2 put no image tokens in the
    # decoder's sequence (cross-attention; encoder input), so they have no "image tokens not masked" mutation; nor
    # does BLIP-2 with T5, whose placeholders and prompt are the encoder's input, never decoder targets.
    M("florence2: first decoder token not the decoder start token", FLORENCE,
      "    return processor.tokenizer.eos_token_id\n", "    return processor.tokenizer.bos_token_id\n",
      (FLORENCE_LABELS,)),
    M("florence2: pads not -100", FLORENCE,
      'labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)',
      'labels = encoded["input_ids"].clone()',
      (FLORENCE_LABELS,)),
    M("florence2: prompt not masked (the task prompt leaks into the decoder targets)", FLORENCE,
      "encoded = tokenizer(captions, padding=", "encoded = tokenizer([f\"{task_of(prompt)} {c}\" for c in captions], padding=",
      (FLORENCE_LABELS,)),
    M("blip2 (OPT): first token not bos </s>", BLIP2,
      'text_ids, text_mask = encoded["input_ids"], encoded["attention_mask"]',
      'text_ids, text_mask = encoded["input_ids"], encoded["attention_mask"]; text_ids[:, 0] = tokenizer.unk_token_id',
      (BLIP2_LABELS,)),
    M("blip2 (T5): first decoder token not decoder_start_token_id", BLIP2,
      "return tokenizer.pad_token_id if is_encoder_decoder(processor) else tokenizer.bos_token_id",
      "return tokenizer.eos_token_id if is_encoder_decoder(processor) else tokenizer.bos_token_id",
      (BLIP2_LABELS,)),
    M("blip2 (OPT): image tokens not masked", BLIP2,
      "labels = torch.cat([torch.full((len(captions), _queries(processor)), IGNORE_INDEX), text_labels], 1)",
      "labels = torch.cat([input_ids[:, :_queries(processor)], text_labels], 1)",
      (BLIP2_LABELS,)),
    M("blip2 (OPT): prompt not masked", BLIP2,
      "text_labels[:, :prompt_tokens] = IGNORE_INDEX", "text_labels[:, :1] = IGNORE_INDEX",
      (BLIP2_LABELS,)),
    M("blip2 (OPT): pads not -100", BLIP2,
      "text_labels = text_ids.masked_fill(text_mask == 0, IGNORE_INDEX)", "text_labels = text_ids.clone()",
      (BLIP2_LABELS,)),
    M("blip2 (T5): pads not -100", BLIP2,
      "labels = decoder_input_ids.masked_fill(decoder_attention_mask == 0, IGNORE_INDEX)",
      "labels = decoder_input_ids.clone()",
      (BLIP2_LABELS,)),
    # PaliGemma: one decoder over [image tokens] <bos> prefix \n caption <eos>; token_type_ids 0 mark the
    # bidirectional prefix block (and make the labels), so dropping or shifting them is a bug of its own.
    M("paligemma: first text token not <bos>", PALI,
      'return tokenizer(tokenizer.bos_token + prefix_of(prompt) + "\\n", add_special_tokens=False)["input_ids"]',
      'return tokenizer(prefix_of(prompt) + "\\n", add_special_tokens=False)["input_ids"]',
      (PALI_ROWS,)),
    M("paligemma: generation prompt lacks the \"\\n\" after the prefix", PALI,
      "_seq_length(processor) + prefix_ids(processor.tokenizer, prompt))",
      "_seq_length(processor) + prefix_ids(processor.tokenizer, prompt)[:-1])",
      (PALI_ROWS,)),
    M("paligemma: pads not -100 (token_type_ids 1 on padding)", PALI,
      "token_type_ids[row, len(head):end] = 1", "token_type_ids[row, len(head):] = 1",
      (PALI_ROWS,)),
    M("paligemma: prefix not masked (labels from attention_mask)", PALI,
      "labels = input_ids.masked_fill(token_type_ids == 0, IGNORE_INDEX)",
      "labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)",
      (PALI_ROWS,)),
    M("paligemma: image tokens not masked", PALI,
      "labels = input_ids.masked_fill(token_type_ids == 0, IGNORE_INDEX)",
      "labels = input_ids.masked_fill((token_type_ids == 0) & (input_ids != processor.image_token_id), "
      "IGNORE_INDEX)",
      (PALI_ROWS,)),
    M("paligemma: loss labels not shifted past the image tokens", PALI,
      'return logits, batch["labels"][:, images:]', 'return logits, batch["labels"][:, :keep]',
      (PALI_LOSS,)),
    M("paligemma: token_type_ids not passed to the forward (prefix attends causally)", PALI,
      'attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],',
      'attention_mask=batch["attention_mask"],',
      (PALI_LOSS,)),
    M("paligemma: token_type_ids 1 from the \"\\n\" on (prefix block one short)", PALI,
      "token_type_ids[row, len(head):end] = 1", "token_type_ids[row, len(head) - 1:end] = 1",
      (PALI_ROWS,)),
    M("paligemma: generation prompt without token_type_ids", PALI,
      '"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}',
      '"attention_mask": torch.ones_like(ids)}',
      (PALI_ROWS,)),
    # SmolVLM: a chat-template row; everything before the assistant's reply (role markers, image tokens, the
    # instruction, the generation prompt "Assistant:") is -100.
    M("smolvlm: generation prompt missing (\"Assistant:\" becomes a label, generate() starts in the user turn)", SMOL,
      "return processor.apply_chat_template(messages(prompt), add_generation_prompt=True, tokenize=False)",
      "return processor.apply_chat_template(messages(prompt), add_generation_prompt=False, tokenize=False)",
      (SMOL_LABELS,)),
    M("smolvlm: generation prompt's <image> not expanded (generate() starts from another context)", SMOL,
      "ids = torch.tensor(prompt_ids(processor, prompt)).expand(batch, -1).clone()",
      'ids = torch.tensor(processor.tokenizer(prompt_text(processor, prompt), add_special_tokens=False)["input_ids"])'
      ".expand(batch, -1).clone()",
      (SMOL_LABELS,)),
    M("smolvlm: pads not -100", SMOL,
      "labels[row, len(head):end] = torch.tensor(reply)", "labels[row, len(head):] = input_ids[row, len(head):]",
      (SMOL_LABELS,)),
    M("smolvlm: instruction and role markers not masked (only image tokens and pads -100)", SMOL,
      "labels[row, len(head):end] = torch.tensor(reply)",
      "labels[row, :end] = input_ids[row, :end].masked_fill(input_ids[row, :end] == processor.image_token_id, "
      "IGNORE_INDEX)",
      (SMOL_LABELS,)),
    M("smolvlm: image tokens not masked", SMOL,
      "labels[row, len(head):end] = torch.tensor(reply)",
      "labels[row, len(head):end] = torch.tensor(reply)\n"
      "        labels[row][input_ids[row] == processor.image_token_id] = processor.image_token_id",
      (SMOL_LABELS,)),
    M("git: first token not [CLS]", GIT,
      'input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]',
      'input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]; '
      "input_ids[:, 0] = tokenizer.sep_token_id",
      ("tests/test_git.py::test_labels_cover_text_only_and_start_where_generate_starts",)),
    M("git: pads not -100", GIT,
      "labels = input_ids.masked_fill(attention_mask == 0, -100)", "labels = input_ids.clone()",
      ("tests/test_git.py::test_labels_cover_text_only_and_start_where_generate_starts",)),
    M("git: prompt not masked", GIT,
      "labels[:, :prompt_tokens] = -100", "labels[:, :1] = -100",
      ("tests/test_git.py::test_labels_cover_text_only_and_start_where_generate_starts",)),
    M("git: image tokens not masked (image-token logits predict the caption)", GIT,
      "logits_to_keep=input_ids.shape[1]).logits", ").logits",
      ("tests/test_git.py::test_loss_equals_gits_own_loss_once_shifted_past_the_image_tokens",),
      more=((GIT, "return logits[:, logits.shape[1] - input_ids.shape[1]:]", "return logits[:, :input_ids.shape[1]]"),)),
]


def repository_files(root: Path) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (the working tree as the tests see it)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                            check=True, capture_output=True).stdout.decode()
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, dest: Path) -> None:
    for name in repository_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def target_count(path: Path, old: str) -> int:
    return path.read_text(encoding="utf-8").count(old) if path.is_file() else 0


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    # Its own process group: a timeout must also end the servers and torchrun workers the tests started.
    process = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return -1, f"timed out after {timeout:g} s"
    lines = [line for line in stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    tail = lines[0] if lines else (stdout.strip().splitlines() or [""])[-1]
    return process.returncode, tail


def check_copy_imports_itself(copy: Path) -> None:
    """The mutated copy must be what `import captune` finds (an installed copy would make every mutation survive)."""
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    found = subprocess.run([sys.executable, "-c", "import captune; print(captune.__file__)"], env=env, cwd=copy,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"mutants: `import captune` in the copy loads {found}, not the copy: the results would be meaningless")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this (case-insensitive)")
    parser.add_argument("--list", action="store_true",
                        help="list the mutations, whether each target is found and their tests; run nothing")
    parser.add_argument("--baseline", action="store_true", help="first run each selected mutation's tests unmutated")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation's test run (default 900)")
    args = parser.parse_args(argv)
    selected = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if not selected:
        print(f"mutants: no mutation name contains {args.k!r}", file=sys.stderr)
        return 2
    if args.list:
        missing = 0
        for m in selected:
            print(m.name)
            for relative, old, _ in m.edits():
                count = target_count(ROOT / relative, old)
                missing += count != 1
                print(f"    {relative}: " + ("target found" if count == 1 else
                                            f"TARGET {'NOT FOUND' if count == 0 else 'AMBIGUOUS'}"))
            print("    " + "\n    ".join(m.tests))
        return 1 if missing else 0
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="captune-mutants-") as tmp:
        copy = Path(tmp)
        copy_tree(ROOT, copy)
        check_copy_imports_itself(copy)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
            code, tail = run_tests(copy, tests, args.timeout * 4)
            print(f"baseline ({len(tests)} test targets, unmutated): exit {code} {tail}", flush=True)
            if code != 0:
                print("mutants: the mapped tests fail without any mutation; fix that first", file=sys.stderr)
                return 1
        for m in selected:
            bad = [(relative, old, target_count(copy / relative, old)) for relative, old, _ in m.edits()]
            bad = [(relative, old, count) for relative, old, count in bad if count != 1]
            if bad:
                relative, old, count = bad[0]
                verdict, detail, seconds = "TARGET NOT FOUND" if count == 0 else "TARGET AMBIGUOUS", \
                    f"{relative}: {count} matches of {old.strip()[:60]!r}", 0.0
            else:
                originals = {}
                started = time.perf_counter()
                try:
                    for relative, old, new in m.edits():
                        path = copy / relative
                        originals.setdefault(path, path.read_text(encoding="utf-8"))
                        path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
                    code, detail = run_tests(copy, m.tests, args.timeout)
                finally:
                    for path, text in originals.items():
                        path.write_text(text, encoding="utf-8")
                seconds = time.perf_counter() - started
                # 1: a test failed. 2-5: interrupted, internal error, usage error (a test id that no longer exists),
                # nothing collected: the mapping is broken, which must not pass for a kill.
                verdict = {0: "SURVIVED", 1: "killed"}.get(code, f"ERROR (pytest exit {code})")
            failed |= verdict != "killed"
            rows.append((m.name, verdict, seconds, detail))
            print(f"{verdict:<18} {seconds:6.0f}s  {m.name}  [{detail[:110]}]", flush=True)
    width = max(len(r[0]) for r in rows)
    print("\n" + f"{'mutation':<{width}}  result")
    for name, verdict, seconds, _ in rows:
        print(f"{name:<{width}}  {verdict} ({seconds:.0f} s)")
    survived = [r[0] for r in rows if r[1] != "killed"]
    print(f"\n{len(rows) - len(survived)}/{len(rows)} killed" + (f"; not killed: {', '.join(survived)}" if survived
                                                              else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
