"""push_to_hub uploads the adapter (peft's files), not the base model. Only the Hub's HTTP calls are replaced."""
from huggingface_hub import HfApi
from safetensors.torch import load_file

from deltatune import LoraConfig, get_peft_model
from tiny import tiny_llama


def test_push_to_hub_uploads_the_adapter_files(tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    uploaded = {}

    class Repo:
        repo_id = "user/tiny-lora"

    def create_commit(self, repo_id, operations, **kw):
        for op in operations:  # read the files now: push_to_hub's temporary folder goes away after the call
            with open(op.path_or_fileobj, "rb") as f:
                uploaded[op.path_in_repo] = f.read()
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(HfApi, "create_commit", create_commit)

    class Card:  # the model card would be fetched from the Hub first
        def save(self, path):
            open(path, "w").write("card")

    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **kw: Card())
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    assert pm.push_to_hub("user/tiny-lora") == "commit"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(uploaded)
    assert not [f for f in uploaded if f.startswith("model") or f == "config.json"], sorted(uploaded)
    path = tmp_path / "w.safetensors"
    path.write_bytes(uploaded["adapter_model.safetensors"])
    assert set(load_file(str(path))) == set(pm.get_adapter_state_dict("default"))
