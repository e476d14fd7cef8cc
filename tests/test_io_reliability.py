"""Saving and loading under abuse (issue 15): kills mid-save, hand-edited configs, mixed formats,
bad tensor values, file modes and adapter names that are paths."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from tiny import input_ids, tiny_llama

CONFIG, WEIGHTS, LEGACY = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


def _model(seed=0, alpha=8, **kw):
    base = tiny_llama()  # seeds the base model itself
    torch.manual_seed(seed)  # the adapter's random init
    config = dt.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)
    return dt.get_peft_model(base, config)


def _logits(pm):
    with torch.no_grad():
        return pm.eval()(input_ids()).logits


def _loaded_logits(folder):
    return _logits(dt.PeftModel.from_pretrained(tiny_llama(), folder))


# ---- item 5: a save is atomic for the folder, not per file ---------------------------------------------
def _save_killed_at(pm, folder, kill_at: int) -> int:
    """Save in a forked child that dies (as under kill -9: no handlers, no cleanup) on its ``kill_at``-th rename."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            real, calls = os.replace, [0]

            def replace(src, dst):
                calls[0] += 1
                if calls[0] == kill_at:
                    os._exit(9)
                real(src, dst)

            os.replace = replace
            pm.save_pretrained(folder)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_save_killed_at_any_rename_loads_as_the_old_or_the_new_adapter_never_a_mix(kill_at, tmp_path):
    """Renames: 1 puts the journal in place (the commit point), 2 and 3 move the two files; 4 is never reached."""
    old, new = _model(seed=0, alpha=8), _model(seed=1, alpha=32)
    old.save_pretrained(tmp_path)
    old_logits, new_logits = _logits(old), _logits(new)
    _save_killed_at(new, tmp_path, kill_at)
    got = _loaded_logits(tmp_path)
    assert torch.equal(got, old_logits) or torch.equal(got, new_logits), "weights and config of different saves were mixed"
    # Killed before the commit point: the old save; after it: the new one, completed on load.
    assert torch.equal(got, old_logits if kill_at == 1 else new_logits)
    # A second load sees the same adapter, and a finished folder holds peft's files only.
    assert torch.equal(_loaded_logits(tmp_path), got)
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {CONFIG, WEIGHTS, "README.md"}  # and the model card, as peft


def test_completing_an_interrupted_save_warns_and_a_foreign_journal_is_refused(tmp_path):
    from deltatune.atomic import JOURNAL_NAME

    old, new = _model(seed=0), _model(seed=1, alpha=32)
    old.save_pretrained(tmp_path)
    _save_killed_at(new, tmp_path, 2)
    with pytest.warns(UserWarning, match="completed a save that was interrupted"):
        dt.PeftConfig.from_pretrained(tmp_path)
    assert not (tmp_path / JOURNAL_NAME).exists()
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_text("keep me")
    # A journal shipped with a downloaded folder must not move files from outside it.
    (tmp_path / JOURNAL_NAME).write_text(json.dumps({"rename": [[f"../{victim.name}", CONFIG]], "remove": []}))
    with pytest.raises(ValueError, match="not a save journal deltatune wrote"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert victim.read_text() == "keep me"


def test_a_completed_save_leaves_only_peft_files_and_keeps_other_files(tmp_path):
    (tmp_path / "optimizer.pt").write_bytes(b"opt")
    pm = _model()
    pm.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    pm.save_pretrained(tmp_path)  # re-saving over the folder keeps the unrelated file and the subfolder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", CONFIG, WEIGHTS, "optimizer.pt", "other"]
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [CONFIG, WEIGHTS]
    assert (tmp_path / "optimizer.pt").read_bytes() == b"opt"


# ---- item 10: wrong-typed adapter_config.json values ---------------------------------------------------
@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("use_rslora", "false", "bool"),
        ("lora_alpha", True, "float"),
        ("lora_alpha", "16", "float"),
        ("r", "8", "int"),
        ("r", 8.5, "int"),
        ("lora_dropout", "0.1", "float"),
        ("target_modules", 5, "a list of str or str or None"),
        ("rank_pattern", ["q_proj"], "a mapping of str to int"),
        ("use_dora", 1, "bool"),
        ("task_type", 3, "CAUSAL_LM"),
    ],
)
def test_wrong_typed_config_values_are_refused_naming_file_key_and_type(key, value, expected, tmp_path):
    _model().save_pretrained(tmp_path)
    path = tmp_path / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ValueError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    message = str(err.value)
    assert str(path) in message and repr(key) in message and expected in message, message
    assert type(value).__name__ in message, message


def test_a_bad_value_of_the_right_type_names_the_file(tmp_path):
    _model().save_pretrained(tmp_path)
    path = tmp_path / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": -4}))
    with pytest.raises(ValueError, match=r"adapter_config\.json.*r must be a positive integer"):
        dt.PeftConfig.from_pretrained(tmp_path)


# ---- item 11: one weights format per folder --------------------------------------------------------------
@pytest.mark.parametrize("first_safe", [True, False])
def test_saving_one_format_removes_the_other_formats_file(first_safe, tmp_path):
    _model(seed=0).save_pretrained(tmp_path, safe_serialization=first_safe)
    new = _model(seed=1, alpha=16)
    new.save_pretrained(tmp_path, safe_serialization=not first_safe)
    stale = WEIGHTS if first_safe else LEGACY
    assert not (tmp_path / stale).exists(), f"the older {stale} would shadow or confuse the new save"
    assert torch.equal(_loaded_logits(tmp_path), _logits(new))


# ---- item 13: non-finite and integer weights -------------------------------------------------------------
def _tamper(folder, change):
    sd = load_file(str(folder / WEIGHTS))
    key = sorted(sd)[0]
    sd[key] = change(sd[key])
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_file_and_key(value, tmp_path):
    _model().save_pretrained(tmp_path)
    key = _tamper(tmp_path, lambda t: t.index_fill(0, torch.tensor([0]), value))
    base = tiny_llama()
    with pytest.raises(ValueError) as err:
        dt.PeftModel.from_pretrained(base, tmp_path)
    message = str(err.value)
    assert str(tmp_path / WEIGHTS) in message and key in message and "non-finite" in message, message
    assert not any(hasattr(m, "base_layer") for m in base.modules())


def test_integer_weights_are_refused_naming_the_dtype(tmp_path):
    _model().save_pretrained(tmp_path)
    key = _tamper(tmp_path, lambda t: (t * 100).to(torch.int8))
    with pytest.raises(ValueError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    message = str(err.value)
    assert key in message and "int8" in message and "floating" in message and str(tmp_path / WEIGHTS) in message, message


def test_set_peft_model_state_dict_refuses_nan_and_loads_nothing():
    pm = _model()
    sd = dt.get_peft_model_state_dict(pm)
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("nan"))
    before = {n: p.clone() for n, p in pm.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        dt.set_peft_model_state_dict(pm, sd)
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())


# ---- item 15: file modes follow the umask ----------------------------------------------------------------
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
@pytest.mark.parametrize("safe", [True, False])
def test_saved_files_follow_the_umask(mask, mode, safe, umask, tmp_path):
    umask(mask)
    _model().save_pretrained(tmp_path / "out", safe_serialization=safe)
    for name in (CONFIG, WEIGHTS if safe else LEGACY):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == mode, name


def test_re_saving_keeps_the_files_mode(umask, tmp_path):
    umask(0o077)
    pm = _model()
    pm.save_pretrained(tmp_path)
    for name in (CONFIG, WEIGHTS):
        os.chmod(tmp_path / name, 0o644)
    pm.save_pretrained(tmp_path)
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in (CONFIG, WEIGHTS)] == [0o644, 0o644]


# ---- item 16: adapter names are single path components ---------------------------------------------------
BAD_NAMES = ["/tmp/evil", "../evil", "a/b", "a\\b", "", ".", "..", "nul\0byte"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_that_are_paths_are_refused(name):
    config = dt.LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="single folder name"):
        dt.get_peft_model(tiny_llama(), config, adapter_name=name)
    pm = _model()
    with pytest.raises(ValueError, match="single folder name"):
        pm.add_adapter(name, config)
    assert list(pm.peft_config) == ["default"]


def test_save_refuses_a_path_name_that_slipped_in_and_writes_nothing(tmp_path):
    pm = _model()
    outside = tmp_path / "outside"
    pm.peft_config[str(outside)] = pm.peft_config["default"]  # bypassing add_adapter, as old code could
    with pytest.raises(ValueError, match="single folder name"):
        pm.save_pretrained(tmp_path / "out")
    assert not outside.exists() and not (tmp_path / "out").exists()


def test_a_save_removes_stale_temporary_files_of_killed_saves_only(tmp_path):
    import os
    import time

    from deltatune import LoraConfig, get_peft_model
    from tiny import tiny_llama

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4))
    pm.save_pretrained(tmp_path)
    old, fresh = tmp_path / ".tmp-adapter_model.safetensors-0123456789ab", tmp_path / ".tmp-adapter_config.json-ba9876543210"
    old.write_bytes(b"left by a kill -9"), fresh.write_bytes(b"another save, now")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    pm.save_pretrained(tmp_path)
    assert not old.exists() and fresh.exists()
