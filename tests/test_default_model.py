"""The code-search model shipped in the package (`mbert_retrieval/default_model/`).

It was trained by `examples/train_code_model.py`, which kept the standard-library packages json,
email, http, logging, xml, urllib, asyncio, concurrent and sqlite3 out of every stage, so the
functions of those packages are unseen data here.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
from mbert_retrieval.evaluation.code_dataset import build_code_dataset
from mbert_retrieval.evaluation.data import load_beir
from mbert_retrieval.evaluation.harness import evaluate_retriever
from typer.testing import CliRunner

from mbert_retrieval import DenseRetriever
from mbert_retrieval.code import CodeIndex, load_encoder
from mbert_retrieval.models.dense import default_model_dir
from mbert_retrieval.search.models import build_retriever

STDLIB = Path(sysconfig.get_paths()["stdlib"])
pytestmark = pytest.mark.skipif(default_model_dir() is None, reason="no default model in this checkout")


@pytest.fixture(scope="module")
def model():
    return DenseRetriever.from_pretrained()


def test_the_shipped_model_is_a_small_modernbert_under_40_mb(model):
    folder = default_model_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 40 * 2**20
    assert model.encoder.config.num_hidden_layers == 8 and model.dim == 384
    assert (folder / "README.md").read_text().count("nDCG@10") >= 1


@pytest.mark.slow
def test_it_beats_bm25_on_held_out_packages(model, tmp_path):
    for package in ("json", "email"):
        shutil.copytree(
            STDLIB / package, tmp_path / "src" / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    build_code_dataset(
        tmp_path / "src", tmp_path / "set", test_fraction=0.9, dev_fraction=0.05, show_progress=False
    )
    dataset = load_beir(tmp_path / "set", split="test")
    assert len(dataset.queries) >= 50

    def ndcg(retriever) -> float:
        return evaluate_retriever(retriever, dataset, show_progress=False).metrics["NDCG@10"]

    ours = ndcg(build_retriever(f"dense:{default_model_dir()}", device="cpu"))
    bm25 = ndcg(build_retriever("bm25"))
    # reference, packed_sdpa and auto attention alike: 0.643 against BM25's 0.425
    assert ours > 0.45 and ours > bm25 + 0.1, (ours, bm25)


@pytest.mark.slow
def test_index_code_and_search_use_it_when_no_model_is_named(tmp_path):
    from mbert_retrieval.cli import app

    repo = tmp_path / "repo"
    for name in ("email/utils.py", "json/decoder.py", "urllib/parse.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STDLIB / name, repo / name)
    result = CliRunner().invoke(app, ["index-code", str(repo), "--index", str(tmp_path / "index")])
    assert result.exit_code == 0, result.output

    index = CodeIndex.load(tmp_path / "index")
    encoder = load_encoder(None)
    top = {
        query: [hit.symbol for hit in index.search(encoder, query, k=3)]
        for query in (
            "parse a date string into a datetime",
            "decode a JSON document from a string",
            "quote special characters in a URL",
        )
    }
    assert "parsedate_to_datetime" in top["parse a date string into a datetime"], top
    assert any("decode" in symbol for symbol in top["decode a JSON document from a string"]), top
    assert "quote" in top["quote special characters in a URL"], top


# Functions written for this test (never trained on), one per task, in the four other languages.
OTHER_LANGUAGES = {
    "java": """public static String reverseWords(String sentence) {
    String[] words = sentence.trim().split("\\\\s+");
    Collections.reverse(Arrays.asList(words));
    return String.join(" ", words);
}""",
    "javascript": """function debounce(fn, waitMs) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), waitMs);
  };
}""",
    "typescript": """export function chunkArray<T>(items: T[], size: number): T[][] {
  const chunks: T[][] = [];
  for (let i = 0; i < items.length; i += size) {
    chunks.push(items.slice(i, i + size));
  }
  return chunks;
}""",
    "go": """func ReadLines(path string) ([]string, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	var lines []string
	scanner := bufio.NewScanner(file)
	for scanner.Scan() {
		lines = append(lines, scanner.Text())
	}
	return lines, scanner.Err()
}""",
}
WEB_QUERIES = {
    "java": "java reverse the order of words in a string",
    "javascript": "js delay calling a function until typing stops",
    "typescript": "typescript split array into chunks of size n",
    "go": "golang read file line by line",
}


def test_web_style_queries_find_functions_in_four_more_languages(model, tmp_path):
    """Each query's function must rank first among the four and the ~230 held-out functions of json
    and email (version 1 of the model, trained on Python docstrings only, ranked Go's second)."""
    for package in ("json", "email"):
        shutil.copytree(STDLIB / package, tmp_path / "src" / package)
    build_code_dataset(
        tmp_path / "src", tmp_path / "set", test_fraction=0.9, dev_fraction=0.05, show_progress=False
    )
    distractors = load_beir(tmp_path / "set", split="test").document_texts()
    languages = list(OTHER_LANGUAGES)
    documents = model.encode_documents([OTHER_LANGUAGES[lang] for lang in languages] + distractors)
    queries = model.encode_queries([WEB_QUERIES[lang] for lang in languages])
    best = (queries @ documents.T).argmax(axis=1)
    assert [languages[i] if i < len(languages) else "a Python function" for i in best] == languages
