"""LongBench and LongBench-E (Bai et al., 2023; github.com/THUDM/LongBench, MIT).

Data is loaded through ``datasets`` (its ``json`` builder) from LongBench's own jsonl files:
in a local directory (``--data-dir``, the unpacked ``data.zip``: ``<dataset>.jsonl`` and
``<dataset>_e.jsonl``), or straight out of the official ``data.zip`` on the Hugging Face hub
(``--data-url``; the repository's loading script is no longer run by ``datasets`` >= 4).

Prompts, generation budgets, post-processing and metrics are LongBench's (the prompt
templates and budgets below are LongBench's ``dataset2prompt.json`` / ``dataset2maxlen.json``):
the prompt is truncated in the middle to fit ``--lengths`` (default: the model's context),
the chat template is applied except for the few-shot and code datasets, and the few-shot
datasets keep only the first line of the answer. Under ``--protocol decode-question`` (the default)
the text after the context (``question_text``: the question and the template's closing
instruction) goes through decode steps, as Quest's and Twilight's LongBench scripts feed it. LongBench-E (``--longbench-e``) also reports
scores per length bucket (0-4k, 4-8k, 8k+ words of context).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..common import EvalError, PromptEncoder, Sample, hub_reachable, rng_for
from .base import Task

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',  # noqa: E501
    "passage_retrieval_zh": '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_l_zh",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "vcsum": "rouge_l_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l", "lsht": "classification",
    "passage_retrieval_en": "retrieval", "passage_count": "count", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}

DATASETS = tuple(PROMPTS)
ENGLISH = tuple(d for d in DATASETS if d not in
                ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"))
LONGBENCH_E = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec",
               "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")      # few-shot and code: raw prompt
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")                    # answers end at a newline
DEFAULT_DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"


def length_bucket(words: int) -> str:
    """LongBench-E's length buckets, on the dataset's ``length`` field (words of context)."""
    return "0-4k" if words < 4000 else "4-8k" if words < 8000 else "8k+"


def truncate_middle(tokenizer, prompt: str, max_tokens: int) -> str:
    """LongBench's truncation: keep the first and last ``max_tokens // 2`` tokens of the prompt."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[len(ids) - (max_tokens - half):], skip_special_tokens=True))


def question_text(dataset: str, row: dict) -> str:
    """The prompt after the context (the question, or the instruction that ends the template): the part the
    ``decode-question`` protocol runs through decode steps, as Quest's and Twilight's LongBench scripts did."""
    return PROMPTS[dataset].split("{context}", 1)[1].replace("{input}", row.get("input") or "")


def question_token(encoder: PromptEncoder, prompt: str, question: str, chat: bool, num_tokens: int) -> int | None:
    """Index of the token of ``encoder.encode(prompt)`` (``num_tokens`` long) where ``question`` (the text after the
    context) starts; ``None`` when it is not in ``prompt`` whole (truncation cut into it) or nothing precedes it."""
    char = prompt.rfind(question) if question else -1
    if char <= 0:
        return None
    token = encoder.char_to_token(prompt, char, chat=chat)
    return token if 1 <= token < num_tokens else None


def load_longbench(name: str, data_dir: str | None, data_url: str = DEFAULT_DATA_URL):
    """Rows of one LongBench dataset (``name`` may end in ``_e``), through ``datasets``."""
    import datasets
    if data_dir:
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.isfile(path):
            raise EvalError(f"--data-dir: {path} not found (expected LongBench's <dataset>.jsonl files)")
        return datasets.load_dataset("json", data_files=path, split="train")
    hint = "; download LongBench's data.zip elsewhere, unzip it and pass --data-dir"
    if data_url.startswith(("http://", "https://")):
        ok, reason = hub_reachable()
        if not ok:
            raise EvalError(f"longbench: cannot fetch {data_url}: {reason}{hint}")
    try:   # fsspec URL chaining: one member of the remote zip
        return datasets.load_dataset("json", data_files=f"zip://data/{name}.jsonl::{data_url}", split="train")
    except Exception as err:  # noqa: BLE001 -- report any loading failure the same way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvalError(f"longbench: cannot load {name!r} from {data_url} ({first}){hint}") from err


class LongBenchTask(Task):
    name = "longbench"
    help = "LongBench / LongBench-E with the standard prompts, truncation and metrics"
    default_lengths = ()        # default: the model's maximum context
    default_samples = 0         # 0: every row of each dataset
    score_name = "score (%)"
    buckets_title = "LongBench-E, by context length (words)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--datasets", nargs="+", choices=DATASETS, metavar="DATASET",
                            help="LongBench datasets (default: the English ones, or LongBench-E's 13 with "
                                 "--longbench-e): " + ", ".join(DATASETS))
        parser.add_argument("--longbench-e", action="store_true",
                            help="use LongBench-E (<dataset>_e) and report scores per length bucket")
        parser.add_argument("--data-dir", help="directory with LongBench's <dataset>.jsonl files "
                                               "(default: load from the hub)")
        parser.add_argument("--data-url", default=DEFAULT_DATA_URL,
                            help="LongBench's data.zip, used when --data-dir is not given "
                                 "(default: the official one on the Hugging Face hub)")

    def datasets(self) -> list[str]:
        chosen = self.args.datasets or (LONGBENCH_E if self.args.longbench_e else ENGLISH)
        if self.args.longbench_e:
            missing = [d for d in chosen if d not in LONGBENCH_E]
            if missing:
                raise EvalError(f"--datasets: {', '.join(missing)} not in LongBench-E "
                                f"(choose from {', '.join(LONGBENCH_E)})")
        return list(dict.fromkeys(chosen))

    def check_arguments(self) -> None:
        self.datasets()
        if self.args.data_dir and not os.path.isdir(self.args.data_dir):
            raise EvalError(f"--data-dir: {self.args.data_dir} is not a directory")

    def metric_names(self) -> list[str]:
        return sorted({METRIC[d] for d in self.datasets()})

    def build_samples(self, tokenizer, encoder: PromptEncoder, lengths: Sequence[int],
                      num_samples: int | None, seed: int) -> list[Sample]:
        samples: list[Sample] = []
        for dataset in self.datasets():
            name = f"{dataset}_e" if self.args.longbench_e else dataset
            rows = load_longbench(name, self.args.data_dir, self.args.data_url)
            order = list(range(len(rows)))
            if num_samples and num_samples < len(order):   # a seeded subset, kept in file order
                order = sorted(rng_for(seed, "longbench", dataset).sample(order, num_samples))
            for i in order:
                row = rows[i]
                for length in lengths:
                    samples.append(self._sample(dataset, row, i, length, tokenizer, encoder))
        if not samples:
            raise EvalError("longbench: no samples to evaluate (empty datasets?)")
        return samples

    def _sample(self, dataset: str, row: dict, index: int, length: int, tokenizer,
                encoder: PromptEncoder) -> Sample:
        max_new = MAX_NEW_TOKENS[dataset]
        chat = encoder.chat and dataset not in NO_CHAT
        prompt = PROMPTS[dataset].format(context=row["context"], input=row.get("input") or "")
        overhead = len(encoder.encode(encoder.render("", chat=chat), chat=chat))
        room = length - max_new - overhead
        if room < 16:
            raise EvalError(f"longbench {dataset}: --lengths {length} is too short for "
                            f"{max_new} new tokens plus the prompt")
        while True:   # re-encoding decoded text can differ by a few tokens: trim until it fits
            text = encoder.render(truncate_middle(tokenizer, prompt, room), chat=chat)
            ids = encoder.encode(text, chat=chat)
            if len(ids) + max_new <= length:
                break
            room -= max(1, len(ids) + max_new - length)
        answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
        meta = {"all_classes": list(row.get("all_classes") or []), "words": row.get("length"),
                "row": index, "row_id": row.get("_id")}
        question_start = question_token(encoder, text, question_text(dataset, row), chat, len(ids))
        if question_start is None:
            meta["no_question_split"] = "the middle truncation cut into the text after the context"
        group = dataset
        if self.args.longbench_e and row.get("length") is not None:
            meta["bucket"] = length_bucket(int(row["length"]))
        return Sample(id=f"{dataset}/{row.get('_id') or index}/L{length}", task=dataset, length=length,
                      input_ids=ids, answers=[str(a) for a in answers], max_new_tokens=max_new,
                      metric=METRIC[dataset], group=group, meta=meta, question_start=question_start)

    def postprocess(self, sample: Sample, text: str) -> str:
        if sample.task in FIRST_LINE_ONLY:
            return text.lstrip("\n").split("\n")[0].strip()
        if sample.metric == "code_sim":
            return text          # LongBench does not strip code predictions
        return text.strip()

    def extra_eos_ids(self, sample: Sample, tokenizer) -> list[int]:
        """LongBench ends the few-shot answers at the first newline (after at least one token)."""
        if sample.task not in FIRST_LINE_ONLY:
            return []
        return tokenizer("\n", add_special_tokens=False)["input_ids"][-1:]
