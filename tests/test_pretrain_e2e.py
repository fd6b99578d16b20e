"""End-to-end pretraining runs through the real entry point (tiny model, 64 px, synthetic data)."""
import json
import signal

import pytest
import torch
from conftest import REPO, TINY_PRETRAIN, run_py

import main_pretrain
import pretraining
from sarwmix.errors import CheckpointError, ConfigError, TrainingError
from util.checkpoint import load_checkpoint, save_atomic


def _run(tmp_path, *extra):
    args = main_pretrain.parse_args([*TINY_PRETRAIN, "--output_dir", str(tmp_path), *extra])
    return main_pretrain.main(args)


def test_run_writes_all_outputs(tmp_path):
    record = _run(tmp_path, "--save_freq", "1")
    for name in ("checkpoint.pth", "checkpoint_1.pth", "checkpoint_2.pth", "log.txt", "train_log.json",
                 "config.yaml", "reconstructions.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    # The last epoch's bytes are written once: checkpoint_2.pth is a hard link of checkpoint.pth (released
    # format, optimizer state included); epoch 2's write replaced checkpoint.pth and left checkpoint_1.pth.
    assert (tmp_path / "checkpoint.pth").samefile(tmp_path / "checkpoint_2.pth")
    first = load_checkpoint(tmp_path / "checkpoint_1.pth")
    assert first["epoch"] == 0 and first["optimizer"]["state"]
    assert load_checkpoint(tmp_path / "checkpoint_2.pth")["optimizer"]["state"]
    assert list(tmp_path.glob("events.out.tfevents.*"))
    epochs = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and record["epoch"] == 1
    steps = [json.loads(x) for x in (tmp_path / "train_log.json").read_text().splitlines()]
    assert len(steps) == 8 and all({"loss", "lr", "grad_norm", "weight_mean"} <= s.keys() for s in steps)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "mixmim_tiny"
    assert ckpt["stats"]["mean"] == [-19.2309, -12.5951]
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= ckpt.keys()


def test_spectral_target_run_logs_both_terms_saves_its_head_and_resumes_exactly(tmp_path):
    spectral = ["--spectral_weight", "2", "--spectral_bins", "6", "3", "--vis_samples", "0", "--save_freq", "1"]
    _run(tmp_path / "full", *spectral)
    epochs = [json.loads(x) for x in (tmp_path / "full" / "log.txt").read_text().splitlines()]
    for e in epochs:
        assert e["train_loss"] == pytest.approx(e["train_pixel_loss"] + 2 * e["train_spectral_loss"], rel=1e-4)
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    assert ckpt["args"]["spectral_weight"] == 2.0 and ckpt["args"]["spectral_bins"] == [6, 3]
    assert "decoder_spec.weight" in ckpt["model"] and "spectral_bin_matrix" not in ckpt["model"]
    # stopped after epoch 1 and resumed: the same weights as the uninterrupted run
    _run(tmp_path / "split", *spectral, "--stop_epoch", "1")
    _run(tmp_path / "split", *spectral, "--resume", "auto")
    resumed = _weights(tmp_path / "split" / "checkpoint.pth")
    assert all(torch.equal(resumed[k], ckpt["model"][k]) for k in ckpt["model"])


def test_stop_epoch_saves_numbered_checkpoint_and_stops(tmp_path):
    _run(tmp_path, "--epochs", "8", "--stop_epoch", "1", "--vis_samples", "0")
    assert (tmp_path / "checkpoint_1.pth").exists()
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 1
    lr = [json.loads(x)["lr"] for x in (tmp_path / "train_log.json").read_text().splitlines()]
    assert lr[-1] < 1.5e-4 * 4 / 256  # still in the warmup of the 8-epoch schedule


def _weights(path):
    return load_checkpoint(path)["model"]


# A run that SIGKILLs itself at the start of its training step number KILL_AT (1-based): deterministic on any
# machine, however fast or loaded (no polling of the log against a clock).
KILL_SELF = """
import os, signal, sys
import main_pretrain, pretraining
real = pretraining.make_pretrain_step
def make(*args, **kwargs):
    step, calls = real(*args, **kwargs), [0]
    def wrapped(model, batch, gen):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(model, batch, gen)
    return wrapped
pretraining.make_pretrain_step = make
main_pretrain.main(main_pretrain.parse_args(sys.argv[1:]))
"""


def test_resume_after_sigkill_is_exact(tmp_path):
    """A run killed mid-epoch and resumed ends with the same weights as an uninterrupted run."""
    common = [*TINY_PRETRAIN, "--epochs", "3", "--num_samples", "24", "--vis_samples", "0"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_py(["main_pretrain.py", *common, "--output_dir", str(full)])
    # 24 samples / batch 4 = 6 steps per epoch: step 9 is the third of epoch 1.
    proc = run_py(["-c", KILL_SELF, *common, "--output_dir", str(killed)], env={"KILL_AT": "9"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    steps = [json.loads(x) for x in (killed / "train_log.json").read_text().splitlines() if x]
    assert steps[-1]["epoch"] == 1, "killed outside epoch 1"
    assert load_checkpoint(killed / "checkpoint.pth")["epoch"] == 0  # the last good checkpoint survived
    run_py(["main_pretrain.py", *common, "--output_dir", str(killed), "--resume", "auto"])
    a, b = _weights(full / "checkpoint.pth"), _weights(killed / "checkpoint.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_epochs = [json.loads(x)["epoch"] for x in (killed / "log.txt").read_text().splitlines()]
    assert log_epochs == [0, 1, 2]


def _poison_steps(monkeypatch, poison) -> None:
    """Wrap the pretraining run's step: ``poison(call_number, model, loss)`` returns the loss to use."""
    real = pretraining.make_pretrain_step
    calls = {"n": 0}

    def poisoned(*a, **k):
        step = real(*a, **k)

        def wrapped(model, batch, gen):
            calls["n"] += 1
            loss, extras, n = step(model, batch, gen)
            return poison(calls["n"], model, loss), extras, n
        return wrapped

    monkeypatch.setattr(pretraining, "make_pretrain_step", poisoned)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    _poison_steps(monkeypatch, lambda call, model, loss: loss * float("nan") if call > 4 else loss)
    with pytest.raises(TrainingError, match="non-finite loss.*last good checkpoint"):
        _run(tmp_path, "--epochs", "3")
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 0


def test_non_finite_input_names_the_sample():
    from engine_pretrain import make_pretrain_step
    from sarwmix.errors import DataError

    step = make_pretrain_step(torch.device("cpu"), [-19.0, -12.0], [3.0, 3.0])
    x = torch.randn(3, 2, 64, 64)
    x[2, 1, 5, 5] = float("nan")
    with pytest.raises(DataError, match="sample 2"):
        step(None, (x, None), torch.Generator())


def test_resume_into_wrong_model_names_first_mismatching_key(tmp_path):
    _run(tmp_path, "--epochs", "1", "--vis_samples", "0")
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight"):
        _run(tmp_path / "other", "--model", "mixmim_small", "--channels", "VV",
             "--resume", str(tmp_path / "checkpoint.pth"))


def _upstream_layout(ckpt: dict) -> dict:
    """``ckpt`` re-saved the way another code base could lay it out: PatchMerging's ``reduction`` registered
    before its ``norm``, and the AdamW groups in the other order (decay first) and by timm's rule (only 1-D
    tensors and biases exempt, so ``mask_token`` moves to the decay group)."""
    import models_mixmim
    from util.lr_decay import param_groups

    model = ckpt["model"]
    order = []
    for k in model:
        if ".downsample." not in k:
            order.append(k)
        elif k not in order:  # the first key of a downsample: all of it, reduction first
            prefix = k.split(".downsample.")[0] + ".downsample."
            order += sorted((x for x in model if x.startswith(prefix)), key=lambda x: ".reduction." not in x)
    reordered = {k: model[k] for k in order}
    fresh = models_mixmim.mixmim_tiny(img_size=64)  # our groups, to name our saved indices
    name_of_id = {id(p): n for n, p in fresh.named_parameters()}
    ours = [name_of_id[id(p)] for g in param_groups(fresh, 0.05) for p in g["params"]]
    indices = [i for g in ckpt["optimizer"]["param_groups"] for i in g["params"]]
    by_index = dict(zip(indices, ours))
    state_of = {by_index[i]: s for i, s in ckpt["optimizer"]["state"].items()}
    theirs = [k for k in reordered if k in ours]  # trainable parameters in their registration order
    exempt = [k for k in theirs if reordered[k].ndim <= 1 or k.endswith(".bias")]
    decay = [k for k in theirs if k not in exempt]
    hyper = {k: v for k, v in ckpt["optimizer"]["param_groups"][0].items() if k != "params"}
    groups = [dict(hyper, weight_decay=0.05, params=list(range(len(decay)))),
              dict(hyper, weight_decay=0.0, params=list(range(len(decay), len(theirs))))]
    state = {i: state_of[k] for i, k in enumerate(decay + exempt) if k in state_of}
    return {**ckpt, "model": reordered, "optimizer": {"state": state, "param_groups": groups}}


def test_resume_from_another_layout_matches_the_optimizer_state_by_name(tmp_path):
    """A checkpoint laid out like the released ones (other registration and AdamW group order, other decay
    rule) resumes to exactly the weights of resuming our own file; a layout that cannot be matched, or a
    finetune-like state dict, is one clear error."""
    _run(tmp_path, "--stop_epoch", "1", "--vis_samples", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    upstream = _upstream_layout(ckpt)
    assert list(upstream["model"]) != list(ckpt["model"])
    assert [len(g["params"]) for g in upstream["optimizer"]["param_groups"]] != \
        [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
    save_atomic(upstream, tmp_path / "released_like.pth")
    _run(tmp_path / "ours", "--resume", str(tmp_path / "checkpoint.pth"), "--vis_samples", "0")
    _run(tmp_path / "theirs", "--resume", str(tmp_path / "released_like.pth"), "--vis_samples", "0")
    a, b = _weights(tmp_path / "ours" / "checkpoint.pth"), _weights(tmp_path / "theirs" / "checkpoint.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The comparison sees the moments: without them (an empty optimizer state, warned) the weights differ.
    save_atomic({**ckpt, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "no_optimizer.pth")
    _run(tmp_path / "fresh", "--resume", str(tmp_path / "no_optimizer.pth"), "--vis_samples", "0")
    c = _weights(tmp_path / "fresh" / "checkpoint.pth")
    assert not torch.equal(a["patch_embed.proj.weight"], c["patch_embed.proj.weight"])

    sd = {k: v for k, v in ckpt["model"].items() if not k.startswith("decoder_blocks.")}
    sd["head.weight"] = torch.zeros(19, 768)
    save_atomic({**ckpt, "model": sd}, tmp_path / "finetune_like.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['decoder_blocks.*unexpected keys \['head.weight'"):
        _run(tmp_path / "a", "--resume", str(tmp_path / "finetune_like.pth"))
    groups = upstream["optimizer"]["param_groups"]
    groups[0]["params"], groups[1]["params"] = groups[0]["params"][:-1], groups[1]["params"] + [99]
    save_atomic(upstream, tmp_path / "unmatched.pth")  # sizes no rule reproduces
    with pytest.raises(CheckpointError, match="optimizer state does not fit .* could not be matched"):
        _run(tmp_path / "b", "--resume", str(tmp_path / "unmatched.pth"))


def test_kill_right_after_a_checkpoint_keeps_its_epoch_log(tmp_path, monkeypatch):
    """Killed after checkpoint.pth of epoch 0 is written: the resumed run's log.txt still has epoch 0."""
    from engine import Trainer

    real = Trainer._save

    def save_then_die(self, epoch, metrics):
        real(self, epoch, metrics)
        raise KeyboardInterrupt  # stands for a SIGKILL right after the rename

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "--vis_samples", "0")
    monkeypatch.setattr(Trainer, "_save", real)
    _run(tmp_path, "--vis_samples", "0", "--resume", "auto")
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1]


@pytest.mark.parametrize("argv,message", [
    (["--input_size", "100"], "valid sizes: [32, 64, 128, 256"),
    (["--model", "mixmim_gigantic"], "unknown model 'mixmim_gigantic'; choices: mixmim_tiny"),
    (["--override", "TRAIN.BATCH_SIZ=4"], "did you mean 'TRAIN.BATCH_SIZE'"),
    (["--resume", "/nonexistent/checkpoint.pth"], "checkpoint not found"),
    (["--num_samples", "3"], "data set of 3 samples is smaller than one global batch of 4"),
    (["--stop_epoch", "0"], "--stop_epoch 0: expected a positive integer"),
    (["--spectral_weight", "-1"], "--spectral_weight -1.0: expected a finite number >= 0"),
    (["--spectral_weight", "1", "--spectral_bins", "0", "4"],
     "--spectral_bins [0, 4]: expected at least one bin each way"),
    (["--mode", "simmim", "--spectral_weight", "1"], "the spectral target is MixMIM's"),
])
def test_bad_input_one_line_and_exit_code(tmp_path, argv, message):
    proc = run_py(["main_pretrain.py", *TINY_PRETRAIN, "--output_dir", str(tmp_path), *argv], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_config_key_names_nearest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_sise: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        main_pretrain.parse_args(["--config", str(cfg)])
    cfg.write_text("batch_size: 4\nepochs: 3\n")
    args = main_pretrain.parse_args(["--config", str(cfg), "--epochs", "5"])
    assert args.batch_size == 4 and args.epochs == 5  # explicit flag wins over the file


@pytest.mark.heavy
@pytest.mark.timeout(900)  # the run's own limit below, above the suite's 600 s per test
def test_quickstart_command_runs(tmp_path):
    """`python main_pretrain.py` with no flags, from a fresh working directory."""
    proc = run_py([str(REPO / "main_pretrain.py")], cwd=tmp_path, timeout=900)
    out = tmp_path / "output_dir"
    for name in ("checkpoint.pth", "log.txt", "config.yaml", "reconstructions.png"):
        assert (out / name).exists(), name
    assert "reconstructions" in proc.stdout and str(out.resolve()) in proc.stdout


@pytest.mark.parametrize("mode,token", [("mixmim", 32), ("simmim", 16)])
def test_token_granularity_uses_the_target_patch_of_the_mode(tmp_path, monkeypatch, mode, token):
    """MixMIM's target patch is the encoder stride (32 px) whatever --mask_patch_size (a SimMIM flag) says."""
    seen = {}

    def capture(*args, **kwargs):
        seen["token"] = args[3].token_size
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(pretraining, "make_pretrain_step", capture)
    args = main_pretrain.parse_args([*TINY_PRETRAIN, "--output_dir", str(tmp_path), "--mode", mode,
                                     "--mask_patch_size", "16", "--weight_granularity", "token"])
    with pytest.raises(KeyboardInterrupt):
        main_pretrain.main(args)
    assert seen["token"] == token


class _FakeDDP(torch.nn.Module):
    """A one-parameter model with DDP's ``no_sync``, recording which micro-batches skip the all-reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.synced: list[bool] = []

    def no_sync(self):
        import contextlib

        self.synced.append(False)
        return contextlib.nullcontext()

    def forward(self, x):
        return (self.w * x).sum()


class _SkippingScaler:
    """GradScaler stand-in: unit scale, records its calls; ``unscale_`` finds inf on the updates in ``skip``."""

    def __init__(self, skip: set[int]) -> None:
        self.skip, self.calls, self.updates = skip, [], 0

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        if self.updates in self.skip:
            for p in optimizer.param_groups[0]["params"]:
                p.grad.fill_(float("inf"))

    def step(self, optimizer):
        self.calls.append("step")
        if self.updates not in self.skip:
            optimizer.step()

    def update(self):
        self.calls.append("update")
        self.updates += 1


def test_fp16_skipped_steps_and_accumulation_keep_the_epoch_grad_norm_finite(monkeypatch):
    """Epoch grad_norm: the mean over the updates the scaler took (not NaN with --accum_iter, not inf after a
    skipped fp16 step); the scaler unscales before the norm is measured; no_sync on all but the last micro-batch."""
    import engine

    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        norms.append(float(torch.cat([p.grad.flatten() for p in params]).norm()))
        scaler.calls.append("clip")
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    model, scaler = _FakeDDP(), _SkippingScaler(skip={0})
    loader = [torch.full((3,), float(k + 1)) for k in range(6)]  # 3 updates of 2 micro-batches
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = engine.train_one_epoch(model, loader, opt, lambda m, x, g: (m(x), {}, 1), epoch=0,
                                   lr_fn=lambda e: 0.1, device=torch.device("cpu"), scaler=scaler,
                                   accum_iter=2, progress=False)
    assert scaler.calls == ["unscale_", "clip", "step", "update"] * 3
    assert model.synced == [False] * 3  # micro-batches 0, 2, 4 of 6
    assert norms[0] == float("inf") and all(n < float("inf") for n in norms[1:])
    assert stats["grad_norm"] == pytest.approx(sum(norms[1:]) / 2)


def test_non_finite_gradient_without_scaler_stops_before_the_step(tmp_path, monkeypatch):
    """bf16/fp32 (no GradScaler): a finite loss with a non-finite gradient at the last update of an epoch
    must not step the optimizer, else checkpoint.pth would be overwritten with NaN weights."""
    def nan_gradient(call, model, loss):
        if call == 8:  # the last iteration of epoch 1: d sqrt(|0|) is nan, the loss stays finite
            p = next(q for q in model.parameters() if q.requires_grad)
            loss = loss + (p - p.detach()).abs().sqrt().sum()
        return loss

    _poison_steps(monkeypatch, nan_gradient)
    with pytest.raises(TrainingError, match="non-finite gradient norm.*epoch 1, iteration 3.*last good"):
        _run(tmp_path, "--epochs", "3", "--vis_samples", "0")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                      if v.is_floating_point())
