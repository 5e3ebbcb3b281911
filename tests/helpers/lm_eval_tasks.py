"""Three tiny lm-eval tasks (local JSONL through `datasets`' json builder, nothing downloaded).

They cover the three request types: multiple choice (loglikelihood), perplexity
(loglikelihood_rolling, long enough to need several windows) and generate_until.
"""

import json

TASKS = ["yq_mc", "yq_ppl", "yq_gen"]

MC = [
    {"question": "The cat sat on the", "choices": ["mat.", "park.", "tree."], "answer": 0},
    {"question": "The dog ran in the", "choices": ["mat.", "park."], "answer": 1},
    {"question": "A bird sang in the", "choices": ["tree.", "fox.", "money now."], "answer": 0},
    {"question": "", "choices": ["Great movie", "Terrible film"], "answer": 1},
]
TEXT = [{"text": "The quick brown fox jumps over the lazy dog. " * 12}, {"text": "Meeting moved to Tuesday at noon."}]
GEN = [
    {"prompt": "The cat sat on", "answer": "the mat."},
    {"prompt": "Spam offers win", "answer": "free money now."},
    {"prompt": "Terrible film, a waste", "answer": "of time."},
]


def task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    for name, rows in (("mc", MC), ("text", TEXT), ("gen", GEN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def data(name):
        return (
            f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / (name + '.jsonl')}\ntest_split: test\n"
        )

    (d / "yq_mc.yaml").write_text(
        "task: yq_mc\n" + data("mc") + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"  # noqa: E501
    )
    (d / "yq_ppl.yaml").write_text(
        "task: yq_ppl\n" + data("text") + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    (d / "yq_gen.yaml").write_text(
        "task: yq_gen\n" + data("gen") + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return d
