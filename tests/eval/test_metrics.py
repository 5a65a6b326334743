"""Every metric against examples worked out by hand (the arithmetic is in the comments)."""
import pytest

from twilight_eval import metrics


def test_string_match_all_counts_the_fraction_of_references_found():
    # "123" and "456" are in the prediction, "789" is not: 2 of 3.
    assert metrics.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert metrics.string_match_all("key ABC-def", ["abc-DEF"]) == 1.0     # case-insensitive
    assert metrics.string_match_all("nothing", ["1"]) == 0.0


def test_string_match_part_needs_any_reference():
    assert metrics.string_match_part("It is 456.", ["123", "456"]) == 1.0
    assert metrics.string_match_part("It is 4.", ["123", "456"]) == 0.0


def test_normalize_answer_lowers_and_drops_punctuation_and_articles():
    assert metrics.normalize_answer("The  Eiffel Tower, in Paris!") == "eiffel tower in paris"
    assert metrics.normalize_answer("An apple a day") == "apple day"


def test_qa_f1_by_hand():
    # pred -> "eiffel tower in paris" (4 tokens), ref -> "eiffel tower" (2): overlap 2,
    # precision 2/4, recall 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert metrics.qa_f1("The Eiffel Tower, in Paris!", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    # pred -> "cat cat dog", ref -> "cat dog dog": multiset overlap cat 1 + dog 1 = 2,
    # precision 2/3, recall 2/3, F1 = 2/3.
    assert metrics.qa_f1("a cat cat dog", ["cat dog dog"]) == pytest.approx(2 / 3)
    # the best reference wins
    assert metrics.qa_f1("Paris", ["the city of Paris", "Paris"]) == 1.0
    assert metrics.qa_f1("London", ["Paris"]) == 0.0


def test_qa_f1_zh_by_jieba_words():
    """LongBench's definition: F1 over jieba's words, each stripped of punctuation, empty ones dropped."""
    assert metrics.jieba_words("北京大学的学生") == ["北京大学", "的", "学生"]
    # one word in common: precision 1/3, recall 1, F1 = 2 * (1/3) / (4/3) = 0.5
    assert metrics.qa_f1_zh("北京大学的学生", ["北京大学"]) == pytest.approx(0.5)
    # 北京市 is one word, not 北京 + 市: no word in common (per character it would be 0.8)
    assert metrics.jieba_words("北京市。") == ["北京市", "。"]
    assert metrics.qa_f1_zh("北京市。", ["北京"]) == 0.0
    assert metrics.qa_f1_zh("北京市", ["北京市！"]) == 1.0  # punctuation is no word


def test_rouge_l_as_the_rouge_package_defines_it():
    """Summary-level union LCS over sentences, divided by the numbers of *distinct* words on each side."""
    # distinct words 5 and 5 ("the" twice counts once); LCS words {the, cat, on, mat}: P = R = F = 4/5
    assert metrics.rouge_l("the cat lay on the mat", ["the cat sat on the mat"]) == pytest.approx(0.8)
    # "cat the" vs "the cat": LCS 1 of 2 distinct words each
    assert metrics.rouge_l("cat the", ["the cat"]) == pytest.approx(0.5)
    # summary level: sentences ('.') in another order still match word for word
    assert metrics.rouge_l("the cat sat. the dog ran", ["the dog ran. the cat sat"]) == pytest.approx(1.0)
    assert metrics.rouge_l("", ["the cat"]) == 0.0  # the package raises on an empty side: 0, as LongBench


def test_rouge_l_zh_by_jieba_words():
    # 今天天气 好 (2 words) vs 今天天气 很 好 (3): LCS 2, precision 1, recall 2/3, F = (4/3) / (5/3) = 0.8
    assert metrics.jieba_words("今天天气很好") == ["今天天气", "很", "好"]
    assert metrics.rouge_l_zh("今天天气好", ["今天天气很好"]) == pytest.approx(0.8)


def test_classification_by_hand():
    classes = ["Food", "Color", "Description", "Definition of something"]
    assert metrics.classification("Food", ["Food"], all_classes=classes) == 1.0
    # two classes named, one right: 1/2
    assert metrics.classification("Food or Color", ["Food"], all_classes=classes) == 0.5
    assert metrics.classification("Color", ["Food"], all_classes=classes) == 0.0
    # "location" is part of the reference "Other location": not counted as a second hit
    places = ["location", "Other location"]
    assert metrics.classification("Other location", ["Other location"], all_classes=places) == 1.0
    # ...but against the reference "location", both classes are named: 1/2
    assert metrics.classification("Other location", ["location"], all_classes=places) == 0.5


def test_retrieval_by_hand():
    assert metrics.retrieval("Paragraph 7", ["Paragraph 7"]) == 1.0
    assert metrics.retrieval("Paragraph 7 or Paragraph 12", ["Paragraph 7"]) == 0.5   # numbers 7, 12
    assert metrics.retrieval("I do not know", ["Paragraph 7"]) == 0.0
    assert metrics.retrieval_zh("段落3", ["段落3"]) == 1.0
    assert metrics.retrieval_zh("段落3和段落4", ["段落3"]) == 0.5


def test_count_by_hand():
    # numbers 13 and 20, one equals the count: 1/2
    assert metrics.count("There are 13 unique paragraphs out of 20", ["13"]) == 0.5
    assert metrics.count("13", ["13"]) == 1.0
    assert metrics.count("many", ["13"]) == 0.0


def test_code_sim_takes_the_first_code_line():
    assert metrics.first_code_line("```python\n\n# comment\nreturn x + 1\nfoo()") == "return x + 1"
    assert metrics.code_sim("```python\n# comment\nreturn x + 1\n", ["return x + 1"]) == 1.0
    # "return x+1" is "return x + 1" less two spaces: 10 matching characters of 10 + 12, ratio 20/22 = 0.909,
    # which fuzzywuzzy rounds to the integer percentage 91 (LongBench divides by 100)
    assert metrics.code_sim("return x+1", ["return x + 1"]) == 0.91
    # "abcdef" vs "abcxyz": 3 matching characters of 6 + 6, 6/12 = 0.5 exactly
    assert metrics.code_sim("abcdef", ["abcxyz"]) == 0.5
    # "abcdefg" vs "abcd": 8/11 = 0.727 -> 73
    assert metrics.code_sim("abcdefg", ["abcd"]) == 0.73


def test_score_dispatches_by_name_and_rejects_unknown_metrics():
    assert metrics.score("count", "3", ["3"]) == 1.0
    assert metrics.score("classification", "Food", ["Food"], all_classes=["Food"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.score("bleu", "a", ["a"])
