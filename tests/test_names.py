"""Names the compiler, the runtime and the bench share are defined once, in the runtime: profile
names from calibration specs, head-graph keys and weights-file names of a bundle."""
import os

from conflayers.runtime import Bundle
from conflayers.runtime.draftplan import head_key, weights_file_name
from conflayers.runtime.profile import safe_name, task_name


def test_task_name_of_specs_and_files(tmp_path):
    assert task_name("gsm8k") == "gsm8k"
    assert task_name("spec_bench:qa") == "spec_bench-qa"
    assert task_name("spec_bench:qa,rag") == "spec_bench-qa_rag"
    path = tmp_path / "My prompts!.jsonl"
    path.write_text("{}\n")
    assert task_name(str(path)) == "My_prompts"
    assert safe_name("..//..", "model") == "model"


def test_bundle_writer_uses_the_runtime_names(tiny_bundle):
    bundle = Bundle.open(tiny_bundle, verify=False)
    for task, profile in bundle.profiles.items():
        entry = bundle.manifest["profiles"][task]
        assert entry["head"] == head_key(profile.plan.precision, profile.vocab_ids)
        assert weights_file_name(profile.plan.precision) in bundle.manifest["files"]
    assert head_key("int8") == "int8-full"
    assert head_key("fp32", [3, 4]) != head_key("fp32", [4, 3]) != head_key("int8", [4, 3])
    assert os.path.isfile(os.path.join(tiny_bundle, weights_file_name("fp32")))
