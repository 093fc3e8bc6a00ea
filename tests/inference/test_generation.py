"""generate.py and component.inference (engine, chat, compare, report, scoring) on a tiny random Llama with a random LoRA adapter.

Nothing is downloaded: the model, tokenizer and adapter are built in a temporary folder once per session.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from io import StringIO

import pytest
import torch

from component.config.generation import PRESETS, resolve_settings
from component.config.inference import ChatOptions, CompareOptions, parse_options
from component.config.parser import ConfigError
from component.data.conversation import Conversation, Turn
from component.data.template import HumanAssistantTemplate, get_template
from component.inference.chat import ChatSession, chat_loop
from component.inference.compare import Question, compare_models, run_compare
from component.inference.engine import clean_answer, generate_answers, load_for_generation
from tests.utils import REPO, TINY_LLAMA, skip_without_demo

TINY = TINY_LLAMA  # the suite's tiny Llama (tests/conftest.py)
QUESTIONS = ["把 1234 逐位写成汉字", "你好 <b>|</b>", "把 90 逐位写成汉字"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Base model folder and a LoRA adapter on it with random (non-zero) weights, so on/off differ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from component.demo_assets import build_tiny_model

    root = tmp_path_factory.mktemp("generation")
    base = build_tiny_model(root / "base", config=TINY, seed=0)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = root / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    (adapter / "train_args.json").write_text(json.dumps({"template": "human_assistant"}), encoding="utf-8")
    return {"base": str(base), "adapter": str(adapter), "root": str(root)}


@pytest.fixture(scope="session")
def loaded(tiny):
    """(model with adapter, tokenizer, template), loaded once."""
    return load_for_generation(CompareOptions(model_name_or_path=tiny["base"], adapter=tiny["adapter"]))


# --- presets and validation -------------------------------------------------------------------------------------

EXPECTED_KWARGS = {
    "default": {
        "do_sample": True,
        "temperature": 0.6,
        "top_k": 50,
        "top_p": 0.8,
        "num_beams": 1,
        "repetition_penalty": 2.0,
        "no_repeat_ngram_size": 0,
        "max_new_tokens": 512,
    },
    "greedy": {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    "beam": {"do_sample": False, "num_beams": 4, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    "top_k": {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "num_beams": 1},
    "top_p": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 0.92, "num_beams": 1},
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_maps_to_generate_kwargs(preset):
    kwargs = resolve_settings(preset).generate_kwargs()
    assert {k: kwargs[k] for k in EXPECTED_KWARGS[preset]} == EXPECTED_KWARGS[preset]
    assert kwargs["max_new_tokens"] == 512
    if not kwargs["do_sample"]:  # search modes pass no sampling flags transformers would warn about
        assert not {"temperature", "top_k", "top_p"} & set(kwargs)


def test_overrides_and_beam_sampling():
    settings = resolve_settings("beam", {"do_sample": True, "top_p": 0.5, "num_beams": 3, "max_new_tokens": 7})
    assert settings.generate_kwargs() == {
        "do_sample": True,
        "num_beams": 3,
        "max_new_tokens": 7,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 0.5,
    }


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("top_p", {"top_p": 1.5}, "top_p must be in (0, 1]"),
        ("top_p", {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ("default", {"temperature": 0.0}, "temperature must be > 0"),
        ("top_k", {"top_k": -1}, "top_k must be >= 0"),
        ("beam", {"top_p": 0.8}, "decodes deterministically"),
        ("greedy", {"temperature": 0.7}, "decodes deterministically"),
        ("greedy", {"num_beams": 0}, "num_beams must be >= 1"),
        ("greedy", {"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ("greedy", {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ("gredy", {}, "Did you mean 'greedy'?"),
        ("greedy", {"max_new_token": 5}, "Did you mean 'max_new_tokens'?"),
    ],
)
def test_invalid_settings_are_config_errors(preset, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_settings(preset, overrides)


def test_options_from_config_file_generation_config_and_command_line(tmp_path, tiny):
    generation = tmp_path / "generation.json"
    generation.write_text(json.dumps({"top_p": 0.5, "max_new_tokens": 20, "repetition_penalty": 1.2}))
    config = tmp_path / "compare.json"
    config.write_text(
        json.dumps(
            {
                "_comment": "notes are allowed",
                "model_name_or_path": tiny["base"],
                "adapter": tiny["adapter"],
                "preset": ["greedy", "top_p"],
                "generation_config": str(generation),
                "max_new_tokens": 9,
                "batch_size": 2,
            }
        )
    )
    options = parse_options(CompareOptions, ["--config", str(config), "--max_new_tokens", "5", "--seed", "7"])
    greedy, top_p = options.settings()
    # preset < generation_config file < --config file < command line; sampling knobs only tune sampling presets
    assert greedy.generate_kwargs()["max_new_tokens"] == 5 and greedy.seed == 7
    assert greedy.repetition_penalty == 1.2 and "top_p" not in greedy.generate_kwargs()
    assert top_p.top_p == 0.5 and top_p.max_new_tokens == 5
    assert options.batch_size == 2
    single = parse_options(CompareOptions, ["--config", str(config), "--preset", "top_k"])
    assert [s.preset for s in single.settings()] == ["top_k"]


@pytest.mark.parametrize(
    ("config", "argv", "message"),
    [
        ({"adaptor": "x"}, [], "unknown key 'adaptor'. Did you mean 'adapter'?"),
        ({}, ["--temprature", "0.5"], "Did you mean 'temperature'?"),
        ({"max_new_tokens": "many"}, [], "'max_new_tokens' must be an integer"),
        ({}, ["--top_p", "2"], "top_p must be in (0, 1]"),
        ({}, ["--preset", "greedy", "--top_k", "5"], "decodes deterministically"),
        ({}, ["--questions", "q.txt", "--references", "r.jsonl"], "either 'questions' or 'references'"),
        ({}, ["--quantization", "4bits"], "Did you mean '4bit'?"),
    ],
)
def test_option_errors_name_the_key(tmp_path, tiny, config, argv, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_name_or_path": tiny["base"], **config}))
    for name in ("q.txt", "r.jsonl"):
        (tmp_path / name).write_text("x\n")
    argv = [a if a not in ("q.txt", "r.jsonl") else str(tmp_path / a) for a in argv]
    with pytest.raises(ConfigError) as error:
        parse_options(CompareOptions, ["--config", str(path), *argv])
    assert message in str(error.value)


def test_cli_reports_config_errors_without_a_traceback(tiny):
    result = subprocess.run(
        [sys.executable, "generate.py", "compare", "--model_name_or_path", tiny["base"], "--top_p", "1.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "config error:" in result.stderr and "top_p must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr


# --- prompts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["human_assistant", "chat_template", "baichuan_chat"])
def test_inference_prompt_is_the_training_prompt_up_to_the_reply(loaded, name):
    model, tokenizer, _ = loaded
    template = get_template(name, tokenizer)
    history = [Turn("你好", "您好，有什么可以帮您？")]
    conversation = Conversation([*history, Turn("把 1234 逐位写成汉字", "一二三四")], system="你是助手")
    training = template.encode(conversation, max_seq_length=10_000)
    final_reply = template.encode_turns(conversation)[-1][1]

    session = ChatSession(model, tokenizer, template, resolve_settings("greedy"), system="你是助手")
    session.history = list(history)
    chat_prompt = session.build_prompt("把 1234 逐位写成汉字")
    question = Question("把 1234 逐位写成汉字", history, "你是助手")
    compare_prompt = template.encode_prompt(question.history, question.query, question.system)

    for prompt in (chat_prompt, compare_prompt):
        assert training.input_ids == prompt + final_reply  # ids: prompt, then exactly the trained reply
        assert training.labels[len(prompt) :] == final_reply
        rendered = tokenizer.decode(prompt, skip_special_tokens=False)
        assert template.render(conversation).startswith(rendered)  # and as text


# --- generation -------------------------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_adapter_off_equals_the_base_alone(tiny, loaded):
    model, tokenizer, template = loaded
    questions = [Question(q) for q in QUESTIONS]
    greedy = [resolve_settings("greedy", {"max_new_tokens": 8})]
    first = compare_models(model, tokenizer, template, questions, greedy, batch_size=2)
    again = compare_models(model, tokenizer, template, questions, greedy, batch_size=2)
    assert first == again
    base_alone, base_tokenizer, _ = load_for_generation(CompareOptions(model_name_or_path=tiny["base"]))
    alone = compare_models(base_alone, base_tokenizer, template, questions, greedy, batch_size=2)
    answers = {m: [r["answer"] for r in first if r["model"] == m] for m in ("base", "sft")}
    assert [r["answer"] for r in alone] == answers["base"]
    assert answers["sft"] != answers["base"]  # the adapter is really switched on for "sft"
    # Left padding does not change an answer: batched equals one at a time.
    prompts = [template.encode_prompt([], q) for q in QUESTIONS]
    one_by_one = generate_answers(base_alone, base_tokenizer, template, prompts, greedy[0], batch_size=1)
    assert one_by_one == answers["base"]


def test_answer_excludes_prompt_and_stops_at_the_templates_stop_tokens(loaded):
    model, tokenizer, template = loaded
    prompt = template.encode_prompt([], QUESTIONS[0])
    settings = resolve_settings("greedy", {"max_new_tokens": 12})
    with torch.no_grad():
        free = model.generate(
            input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=[], pad_token_id=3
        )[0, len(prompt) :].tolist()
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stop = free[cut]

    class StopAt(HumanAssistantTemplate):
        stop_token_ids = [stop]  # noqa: RUF012  (a stand-in for the template's EOS)

    answer = generate_answers(model, tokenizer, StopAt(tokenizer), [prompt], settings)[0]
    assert answer == tokenizer.decode(free[:cut], skip_special_tokens=True).strip()
    assert "Human:" not in answer and QUESTIONS[0] not in answer

    class WithStopString(HumanAssistantTemplate):
        stop_strings = ["\n\nHuman:"]  # noqa: RUF012

    ids = tokenizer("四五\n\nHuman: 再问", add_special_tokens=False)["input_ids"]
    assert clean_answer(ids, tokenizer, WithStopString(tokenizer)) == "四五"
    assert clean_answer([*ids[:2], tokenizer.eos_token_id, *ids[2:]], tokenizer, template) == "四五"


def test_4bit_loading_generates(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from component.demo_assets import build_tiny_model

    # bitsandbytes' CPU kernels quantize in blocks of 64 input features: wider than the shared tiny model.
    base = build_tiny_model(tmp_path / "base", config={**TINY, "hidden_size": 64, "intermediate_size": 128})
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(tmp_path / "adapter")
    options = CompareOptions(model_name_or_path=str(base), adapter=str(tmp_path / "adapter"), quantization="4bit")
    model, tokenizer, template = load_for_generation(options)
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    greedy = [resolve_settings("greedy", {"max_new_tokens": 4})]
    rows = compare_models(model, tokenizer, template, [Question(QUESTIONS[0])], greedy)
    assert [r["model"] for r in rows] == ["base", "sft"]


# --- chat -------------------------------------------------------------------------------------------------------


def test_chat_through_stdin_keeps_history_and_obeys_reset(loaded):
    model, tokenizer, template = loaded
    session = ChatSession(model, tokenizer, template, resolve_settings("greedy", {"max_new_tokens": 5}))
    prompts: list[list[int]] = []
    build = session.build_prompt
    session.build_prompt = lambda query: prompts.append(build(query)) or prompts[-1]
    stdin = StringIO("你好\n\n把 12 逐位写成汉字\n/reset\n再见\n/exit\n不会被问到\n")
    out = StringIO()
    chat_loop(session, stdin, out)

    assert len(prompts) == 3  # nothing after /exit
    assert prompts[0] == template.encode_prompt([], "你好")
    assert prompts[2] == template.encode_prompt([], "再见")  # /reset emptied the history
    # The second prompt carries the first exchange, answer included.
    assert len(prompts[1]) > len(template.encode_prompt([], "把 12 逐位写成汉字"))
    assert session.history[0].user == "再见" and len(session.history) == 1
    text = out.getvalue()
    assert text.count("Assistant: ") == 3 and "[history cleared]" in text
    assert session.history[0].assistant in text  # streamed to the output


def test_chat_drops_oldest_turns_to_fit_the_context(loaded):
    model, tokenizer, template = loaded
    settings = resolve_settings("greedy", {"max_new_tokens": 6})
    session = ChatSession(model, tokenizer, template, settings, max_context=60)
    for number in range(5):
        session.ask(f"把 {number}{number}{number} 逐位写成汉字")
        assert len(session.last_prompt_ids) + settings.max_new_tokens <= 60
    assert session.dropped_turns > 0
    assert session.history[-1].user == "把 444 逐位写成汉字"
    assert session.history[0].user != "把 000 逐位写成汉字"


def test_beam_search_chat_writes_the_whole_answer(loaded):
    model, tokenizer, template = loaded
    session = ChatSession(model, tokenizer, template, resolve_settings("beam", {"max_new_tokens": 4}))
    out = StringIO()
    answer = session.ask(QUESTIONS[0], out)  # transformers cannot stream beams: written once, complete
    assert out.getvalue() == answer
    assert generate_answers(model, tokenizer, template, [session.last_prompt_ids], session.settings) == [answer]


def test_chat_cli_scripted_through_stdin(tiny):
    result = subprocess.run(
        [sys.executable, "generate.py", "chat", "--model_name_or_path", tiny["base"], "--adapter", tiny["adapter"]]
        + ["--preset", "greedy", "--max_new_tokens", "4"],
        cwd=REPO,
        input="你好\n/reset\n再见\n/exit\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 2 and "[history cleared]" in result.stdout


# --- compare and reports ----------------------------------------------------------------------------------------


def _compare_options(tiny, tmp_path, **extra) -> CompareOptions:
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n\n", encoding="utf-8")
    values = {
        "model_name_or_path": tiny["base"],
        "adapter": tiny["adapter"],
        "questions": str(questions),
        "preset": ["greedy", "top_k"],
        "max_new_tokens": 6,
        "batch_size": 2,
        "output_dir": str(tmp_path / "report"),
        **extra,
    }
    return CompareOptions(**values)


def test_compare_report_holds_every_question_for_every_model_and_preset(tiny, tmp_path, monkeypatch):
    import component.inference.compare as compare

    # A stand-in reward model: longer answers score higher.
    monkeypatch.setattr(
        compare, "load_reward_scorer", lambda *a, **k: lambda convs: [len(c.turns[-1].assistant) for c in convs]
    )
    options = _compare_options(tiny, tmp_path, reward_model=tiny["root"])
    result, paths = run_compare(options)

    rows = [json.loads(line) for line in paths["answers"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * 2 * len(QUESTIONS)
    assert {(r["preset"], r["model"], r["question"]) for r in rows} == {
        (p, m, q) for p in ("greedy", "top_k") for m in ("base", "sft") for q in QUESTIONS
    }
    assert all(isinstance(r["reward"], (int, float)) for r in rows)
    duel = result.summary["greedy"]["sft_vs_base"]
    assert duel["wins"] + duel["ties"] + duel["losses"] == len(QUESTIONS) and 0 <= duel["win_rate"] <= 1

    markdown = paths["markdown"].read_text(encoding="utf-8")
    page = paths["html"].read_text(encoding="utf-8")
    assert "## Preset `greedy`" in markdown and "## Preset `top_k`" in markdown
    assert markdown.count("你好 <b>\\|</b>") == 2  # once per preset, table pipes escaped
    assert "win rate" in markdown and "win rate" in page
    assert page.count("你好 &lt;b&gt;|&lt;/b&gt;") == 2 and "<b>|" not in page  # escaped HTML
    for row in rows:  # every answer, escaped, in the HTML
        assert html.escape(row["answer"]) in page
    for external in ("http://", "https://", "<script", "<link", " src="):
        assert external not in page  # self-contained
    summary = json.loads(paths["summary"].read_text(encoding="utf-8"))
    assert summary["settings"]["greedy"].startswith("greedy: do_sample=False")


def test_compare_with_references_reports_exact_match(tiny, tmp_path):
    references = tmp_path / "refs.jsonl"
    rows = [{"kind": "Digits", "input": q, "target": "一二三四"} for q in QUESTIONS[:2]]
    references.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    options = _compare_options(tiny, tmp_path, questions=None, references=str(references), preset="greedy")
    result, paths = run_compare(options)
    assert set(result.summary["greedy"]["models"]) == {"base", "sft"}
    assert result.summary["greedy"]["models"]["base"]["exact_match"] == 0.0
    assert "Exact match" in paths["markdown"].read_text(encoding="utf-8")
    assert all(r["reference"] == "一二三四" and r["exact_match"] is False for r in result.rows)


def test_demo_compare_config_parses():
    config = json.loads((REPO / "config/demo/compare.json").read_text(encoding="utf-8"))
    folders = [config["model_name_or_path"], *(a.partition("=")[2] for a in config["adapter"])]
    skip_without_demo(*folders)
    options = parse_options(
        CompareOptions, ["--config", str(REPO / "config/demo/compare.json"), "--reward_model", "null"]
    )
    assert [s.preset for s in options.settings()] == ["greedy"]


def test_real_reward_model_scores_answers(tiny, tmp_path):
    """component.inference.scoring loads a LoRA reward model and scores the compare rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from component.inference.scoring import load_reward_scorer

    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1, pad_token_id=3)
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
        task_type="SEQ_CLS",
        init_lora_weights=False,
    )
    rm = tmp_path / "rm"
    get_peft_model(model, config).save_pretrained(rm)
    (rm / "train_args.json").write_text(
        json.dumps({"model_name_or_path": tiny["base"], "template": "human_assistant", "max_seq_length": 64})
    )
    score = load_reward_scorer(str(rm), batch_size=2)
    conversations = [Conversation([Turn(q, a)]) for q, a in zip(QUESTIONS, ["一二三四", "你好", "九零"])]
    scores = score(conversations)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert score(conversations) == scores


def test_chat_options_take_one_preset(tiny):
    options = parse_options(ChatOptions, ["--model_name_or_path", tiny["base"], "--preset", "greedy,top_p"])
    assert len(options.settings()) == 2  # generate.py chat refuses this with a clear message


def test_compare_runs_several_adapters_on_one_base(tiny, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import component.inference.compare as compare

    torch.manual_seed(5)  # a second adapter, different from the first
    second = tmp_path / "second"
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["base"]), config).save_pretrained(second)
    monkeypatch.setattr(
        compare, "load_reward_scorer", lambda *a, **k: lambda convs: [len(c.turns[-1].assistant) for c in convs]
    )
    argv = ["--model_name_or_path", tiny["base"], "--adapter", f"sft={tiny['adapter']}", "--adapter", f"dpo={second}"]
    options = parse_options(CompareOptions, argv)
    options.questions, options.preset, options.max_new_tokens = _compare_options(tiny, tmp_path).questions, "greedy", 6
    options.reward_model, options.output_dir = tiny["root"], str(tmp_path / "report")
    result, paths = run_compare(options)
    assert list(result.models) == ["base", "sft", "dpo"]
    summary = result.summary["greedy"]
    assert set(summary["models"]) == {"base", "sft", "dpo"}
    assert {"sft_vs_base", "dpo_vs_base", "dpo_vs_sft"} <= set(summary)
    answers = {m: [r["answer"] for r in result.rows if r["model"] == m] for m in ("base", "sft", "dpo")}
    # each column is its own adapter: the same answers as a compare with that adapter alone
    alone = _compare_options(tiny, tmp_path, adapter=str(second), preset="greedy", reward_model=None)
    alone.output_dir = str(tmp_path / "alone")
    single, _ = run_compare(alone)
    assert [r["answer"] for r in single.rows if r["model"] == "sft"] == answers["dpo"]
    assert [r["answer"] for r in single.rows if r["model"] == "base"] == answers["base"]
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "DPO vs Base by reward" in markdown and "DPO vs Fine-tuned (SFT) by reward" in markdown


def test_adapter_names_are_checked():
    with pytest.raises(ConfigError, match="given twice"):
        CompareOptions(adapter=["a=x", "a=y"]).adapters()
    with pytest.raises(ConfigError, match="other than 'base'"):
        CompareOptions(adapter=["base=x"]).adapters()
    assert CompareOptions(adapter="out/sft").adapters() == {"sft": "out/sft"}
