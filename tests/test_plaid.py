"""PlaidIndex: recall against exhaustive MaxSim, each search stage against a slow reference, compression
bounds, add/delete, streaming builds and input errors. CPU only (a CUDA test runs where CUDA is present)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mbert_retrieval.index.codec import ResidualCodec
from mbert_retrieval.index.plaid import PlaidIndex

F = torch.nn.functional


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def colbert_like(n_docs, n_queries, dim=128, mean_len=40, vocab=2048, seed=0):
    """Unit token vectors shaped like ColBERT output: tokens scattered around word vectors, words grouped
    in topical fields, documents of varied length drawing on 1-3 fields plus shared function words;
    queries reuse words of one document, plus expansion tokens near the query mean."""
    g = torch.Generator().manual_seed(seed)
    per_field = 64
    n_fields = vocab // per_field
    fields = F.normalize(torch.randn(n_fields, dim, generator=g), dim=-1)
    words = fields.repeat_interleave(per_field, 0) + torch.randn(vocab, dim, generator=g) * math.sqrt(
        1.5 / dim
    )
    words = F.normalize(words, dim=-1)
    zipf = 1.0 / torch.arange(1, per_field + 1)
    sigma = math.sqrt(0.2 / dim)
    lengths = (
        ((torch.randn(n_docs, generator=g) * 0.5).exp() * mean_len * 0.88).round().clamp(8, 4 * mean_len)
    )
    lengths = lengths.long()
    doc_of = torch.repeat_interleave(torch.arange(n_docs), lengths)
    doc_fields = torch.randint(1, n_fields, (n_docs, 3), generator=g)
    used = torch.randint(1, 4, (n_docs,), generator=g)
    field = doc_fields[doc_of, (torch.rand(len(doc_of), generator=g) * used[doc_of]).long()]
    field[torch.rand(len(doc_of), generator=g) < 0.2] = 0  # function words, in every document
    word = field * per_field + torch.multinomial(zipf, len(doc_of), True, generator=g)
    tokens = F.normalize(words[word] + torch.randn(len(word), dim, generator=g) * sigma, dim=-1)

    offsets = F.pad(lengths.cumsum(0), (1, 0))
    source = torch.randint(n_docs, (n_queries,), generator=g)
    picks = offsets[source, None] + (torch.rand(n_queries, 24, generator=g) * lengths[source, None]).long()
    content = F.normalize(words[word[picks]] + torch.randn(n_queries, 24, dim, generator=g) * sigma, dim=-1)
    noise = torch.randn(n_queries, 8, dim, generator=g) * math.sqrt(0.5 / dim)
    expansion = F.normalize(content.mean(1, keepdim=True) + noise, dim=-1)
    return list(tokens.split(lengths.tolist())), torch.cat([content, expansion], 1)


def exhaustive_maxsim(docs: list[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """[n_q, n_docs] MaxSim scores, one document at a time (the slow reference)."""
    return torch.stack([torch.stack([(q @ d.T).amax(1).sum() for d in docs]) for q in queries])


def decompressed(index: PlaidIndex) -> list[torch.Tensor]:
    return [index.document_embeddings(doc_id) for doc_id in index.ids]


def recall_at_10(found: list[list[str]], scores: torch.Tensor, ids: list[str]) -> float:
    truth = scores.topk(10, dim=1).indices.tolist()
    return np.mean([len(set(f) & {ids[i] for i in t}) / 10 for f, t in zip(found, truth)])


@pytest.fixture(scope="module")
def corpus():
    docs, queries = colbert_like(n_docs=1200, n_queries=40)
    ids = [f"doc-{i}" for i in range(len(docs))]
    return docs, queries, ids


@pytest.fixture(scope="module")
def index(corpus):
    docs, _, ids = corpus
    return PlaidIndex.build(docs, ids, nbits=2, device="cpu", show_progress=False, model_name="test-colbert")


def test_recall_at_default_settings_against_exhaustive_maxsim(corpus, index):
    """The search stages (probing, pruned centroid interaction, shortlist) lose almost nothing against
    exhaustive MaxSim over the same stored vectors."""
    _, queries, ids = corpus
    found, scores = index.search(queries, k=10)
    truth = exhaustive_maxsim(decompressed(index), queries)
    assert recall_at_10(found, truth, ids) >= 0.95  # 5 corpus seeds: 1.0
    assert scores.dtype == np.float32 and scores.shape == (len(queries), 10)
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "scores must come sorted, best first"


# 5 corpus seeds: 2 bits 0.915-0.945, 4 bits 0.9725-0.985
@pytest.mark.parametrize("nbits, floor", [(2, 0.88), (4, 0.94)])
def test_recall_against_exhaustive_maxsim_on_original_embeddings(corpus, index, nbits, floor):
    """End to end, compression included: 2 bits per dimension cost some recall, 4 bits little
    (0.93 and 0.985 here with Lloyd-Max buckets; 0.89 and 0.95 with ColBERTv2's shared quantiles)."""
    docs, queries, ids = corpus
    built = (
        index if nbits == 2 else PlaidIndex.build(docs, ids, nbits=nbits, device="cpu", show_progress=False)
    )
    found, _ = built.search(queries, k=10)
    assert recall_at_10(found, exhaustive_maxsim(docs, queries), ids) >= floor


def test_exhaustive_settings_give_exact_maxsim_over_stored_vectors(corpus, index):
    """Probing every centroid, pruning nothing and re-scoring every document is exhaustive search."""
    _, queries, ids = corpus
    found, scores = index.search(
        queries[:8], k=10, n_probe=index.n_centroids, centroid_score_threshold=-2.0, n_candidates=len(index)
    )
    truth = exhaustive_maxsim(decompressed(index), queries[:8])
    best = truth.topk(10, dim=1)
    assert np.allclose(scores, best.values.numpy(), atol=1e-4)
    for row, top in zip(found, best.indices.tolist()):
        assert row == [ids[i] for i in top]


def test_centroid_interaction_matches_per_document_reference(corpus, index):
    """Stage 2 (vectorised over the inverted lists) against a loop over each candidate's token codes."""
    _, queries, _ = corpus
    threshold = 0.45
    query = queries[:3]
    centroid_scores = query @ index.codec.centroids.T
    candidates = index._probe(centroid_scores, n_probe=2)
    approximate = index._centroid_interaction(centroid_scores, candidates, threshold)

    codes = index._centroid_ids(index.codes)
    expected = []
    for b, doc in candidates.nonzero().tolist():
        start, end = index.doc_offsets[doc].item(), index.doc_offsets[doc + 1].item()
        doc_codes = codes[start:end].unique()
        kept = doc_codes[centroid_scores[b].amax(0)[doc_codes] >= threshold]
        per_token = centroid_scores[b][:, kept].amax(1) if len(kept) else torch.zeros(len(query[b]))
        expected.append(per_token.clamp(min=0).sum())
    assert torch.allclose(approximate, torch.stack(expected), atol=1e-5)


@pytest.mark.parametrize("n_query_probe", [0, 20])
def test_probe_finds_exactly_the_documents_of_probed_centroids(corpus, index, n_query_probe):
    """Each query token's 3 best centroids, plus the query's `n_query_probe` best by summed score."""
    _, queries, _ = corpus
    centroid_scores = queries[:2] @ index.codec.centroids.T
    candidates = index._probe(centroid_scores, n_probe=3, n_query_probe=n_query_probe)
    codes = index._centroid_ids(index.codes)
    doc_of_token = torch.repeat_interleave(torch.arange(len(index)), index.doc_lengths)
    for b in range(2):
        per_token = centroid_scores[b].topk(3, dim=1).indices.flatten()
        whole_query = centroid_scores[b].sum(0).topk(n_query_probe).indices
        probed = torch.cat([per_token, whole_query]).unique()
        assert len(probed) > len(per_token.unique()) or n_query_probe == 0
        expected = torch.zeros(len(index), dtype=torch.bool)
        expected[doc_of_token[torch.isin(codes, probed)]] = True
        assert torch.equal(candidates[b], expected)


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_decompression_error_within_bucket_bounds(nbits):
    g = torch.Generator().manual_seed(nbits)
    centroids = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    points = F.normalize(
        centroids[torch.randint(64, (3000,), generator=g)] + 0.1 * torch.randn(3000, 32), dim=-1
    )
    codec = ResidualCodec.fit(centroids, points, nbits)
    codes, packed = codec.encode(points)
    assert packed.shape == (3000, 32 * nbits // 8) and packed.dtype == torch.uint8

    residuals = (points - centroids[codes]).numpy()
    cutoffs, weights = codec.bucket_cutoffs.numpy(), codec.bucket_weights.numpy()
    assert cutoffs.shape == (32, 2**nbits - 1) and weights.shape == (32, 2**nbits)
    columns = np.arange(32)
    buckets = np.stack(  # reference quantizer, one dimension at a time
        [np.searchsorted(cutoffs[d], residuals[:, d], side="left") for d in columns], axis=1
    )
    assert np.array_equal(codec.unpack(packed).numpy(), buckets)

    error = np.abs(codec.decode(codes, packed).numpy() - points.numpy())
    assert np.allclose(error, np.abs(weights[columns, buckets] - residuals), atol=1e-6)
    low = np.concatenate([residuals.min(0)[:, None], cutoffs], axis=1)
    high = np.concatenate([cutoffs, residuals.max(0)[:, None]], axis=1)
    width = (high - low)[columns, buckets]
    assert np.all(error <= width + 1e-6), "error beyond its bucket's width"
    assert np.all(np.diff(cutoffs, axis=1) >= 0) and np.all(np.diff(weights, axis=1) > 0)


def test_lloyd_max_buckets_beat_shared_quantile_buckets():
    """Per-dimension Lloyd-Max buckets have less squared error than ColBERTv2's equal-count buckets shared
    by all dimensions, and each bucket value is the mean of its residuals (the Lloyd-Max condition)."""
    g = torch.Generator().manual_seed(0)
    centroids = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    spread = torch.linspace(0.02, 0.2, 32)  # dimensions of unequal spread, as in real embeddings
    points = centroids[torch.randint(64, (4000,), generator=g)] + spread * torch.randn(4000, 32, generator=g)
    codec = ResidualCodec.fit(centroids, points, 2)
    codes, packed = codec.encode(points)
    residuals = points - centroids[codes]
    values = residuals.flatten().sort().values
    shared = ResidualCodec(
        centroids,
        values[(torch.tensor([0.25, 0.5, 0.75]) * (len(values) - 1)).long()],
        values[(torch.tensor([0.125, 0.375, 0.625, 0.875]) * (len(values) - 1)).long()],
    )

    def squared_error(c):
        return (c.decode(*c.encode(points)) - points).pow(2).sum(1).mean().item()

    assert squared_error(codec) < 0.8 * squared_error(shared)  # 5 seeds: 0.451-0.457 times
    # One shared table (the layout of indexes saved before per-dimension tables) still decodes.
    shared_codes, shared_packed = shared.encode(points)
    expected = (
        centroids[shared_codes]
        + shared.bucket_weights[0][torch.bucketize(residuals, shared.bucket_cutoffs[0])]
    )
    assert torch.allclose(shared.decode(shared_codes, shared_packed), expected, atol=1e-6)
    buckets = codec.unpack(packed).long()
    for d in (0, 31):
        for b in range(4):
            inside = residuals[buckets[:, d] == b, d]
            assert abs(inside.mean() - codec.bucket_weights[d, b]) < 2e-3
    with pytest.raises(ValueError, match="one row per dimension"):
        ResidualCodec(centroids, codec.bucket_cutoffs[:16], codec.bucket_weights[:16])


def test_more_bits_less_error():
    g = torch.Generator().manual_seed(0)
    centroids = F.normalize(torch.randn(32, 64, generator=g), dim=-1)
    points = F.normalize(
        centroids[torch.randint(32, (2000,), generator=g)] + 0.1 * torch.randn(2000, 64, generator=g), dim=-1
    )
    errors = []
    for nbits in (1, 2, 4):
        codec = ResidualCodec.fit(centroids, points, nbits)
        errors.append((codec.decode(*codec.encode(points)) - points).norm(dim=1).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.3 * errors[0]  # 5 seeds: 0.168-0.171 times


def test_add_and_delete_without_rebuild(corpus):
    docs, queries, ids = corpus
    index = PlaidIndex.build(docs[:800], ids[:800], device="cpu", show_progress=False)
    centroids = index.codec.centroids.clone()
    index.add(docs[800:], ids[800:])
    assert len(index) == len(docs) and index.n_tokens == sum(len(d) for d in docs)
    assert torch.equal(index.codec.centroids, centroids), "adding must not retrain"

    # Every document, old and new, is found by a query made of its own tokens.
    for i in (3, 799, 800, 1199):
        found, _ = index.search(docs[i][None, :32], k=1)
        assert found[0] == [ids[i]]

    exhaustive = dict(n_probe=index.n_centroids, centroid_score_threshold=-2.0, n_candidates=len(docs))
    before_ids, before_scores = index.search(queries[:10], k=20, **exhaustive)
    gone = {row[0] for row in before_ids}
    index.delete(sorted(gone))
    after_ids, after_scores = index.search(queries[:10], k=20, **exhaustive)
    assert len(index) == len(docs) - len(gone)
    assert not gone & {i for row in after_ids for i in row}
    for old_ids, old_scores, new_ids, new_scores in zip(before_ids, before_scores, after_ids, after_scores):
        kept = [(i, s) for i, s in zip(old_ids, old_scores) if i not in gone]
        assert new_ids[: len(kept)] == [i for i, _ in kept]
        assert np.allclose(new_scores[: len(kept)], [s for _, s in kept], atol=1e-5)

    # The derived tables match those of an index holding only the survivors.
    survivors = PlaidIndex(index.codec)
    survivors.codes, survivors.residuals, survivors.doc_lengths = (
        index.codes,
        index.residuals,
        index.doc_lengths,
    )
    survivors._ids = index.ids
    survivors._refresh_layout()
    assert torch.equal(survivors.ivf_docs, index.ivf_docs) and torch.equal(
        survivors.ivf_offsets, index.ivf_offsets
    )


def test_build_streams_from_an_iterator(corpus):
    docs, queries, ids = corpus
    docs, ids = docs[:300], ids[:300]
    options = dict(device="cpu", show_progress=False, kmeans_sample_docs=300, n_centroids=256)
    from_list = PlaidIndex.build(docs, ids, **options)
    from_iterator = PlaidIndex.build((d.numpy() for d in docs), ids, **options)
    assert torch.equal(from_list.codes, from_iterator.codes)
    assert torch.equal(from_list.residuals, from_iterator.residuals)
    assert from_list.search(queries[:4], k=5)[0] == from_iterator.search(queries[:4], k=5)[0]


def test_build_in_small_shards_equals_one_shard(corpus, monkeypatch):
    import mbert_retrieval.index.plaid as plaid

    docs, _, ids = corpus
    options = dict(device="cpu", show_progress=False, n_centroids=256, kmeans_sample_docs=200)
    whole = PlaidIndex.build(docs[:300], ids[:300], **options)
    monkeypatch.setattr(plaid, "SHARD_TOKENS", 500)
    sharded = PlaidIndex.build(docs[:300], ids[:300], **options)
    assert torch.equal(whole.codes, sharded.codes) and torch.equal(whole.doc_lengths, sharded.doc_lengths)


def test_short_result_lists_and_k_above_corpus_size():
    docs, queries = colbert_like(n_docs=30, n_queries=2, mean_len=16)
    ids = [str(i) for i in range(30)]
    index = PlaidIndex.build(docs, ids, device="cpu", show_progress=False, n_centroids=32)
    found, scores = index.search(queries, k=100, n_probe=index.n_centroids, n_candidates=100)
    assert scores.shape == (2, 30) and all(sorted(row) == sorted(ids) for row in found)
    one_token = queries[:, :1]  # one probed centroid: its list may hold fewer than 10 documents
    found, scores = index.search(one_token, k=10, n_probe=1, n_query_probe=0, centroid_score_threshold=0.99)
    assert any(len(row) < 10 for row in found) and np.isinf(scores).any()
    for row, row_scores in zip(found, scores):
        assert len(row) == np.isfinite(row_scores).sum()


def test_bad_input_gets_clear_errors(corpus, index):
    docs, queries, ids = corpus
    with pytest.raises(ValueError, match="empty corpus"):
        PlaidIndex.build([], [], device="cpu")
    with pytest.raises(ValueError, match="documents for 3 ids"):
        PlaidIndex.build(docs[:2], ids[:3], device="cpu", show_progress=False)
    with pytest.raises(ValueError, match="unique"):
        PlaidIndex.build(docs[:2], ["a", "a"], device="cpu")
    with pytest.raises(ValueError, match="shape"):
        index.add([torch.randn(5, 64)], ["new"])
    with pytest.raises(ValueError, match="no token embeddings"):
        index.add([torch.zeros(0, 128)], ["new"])
    with pytest.raises(ValueError, match="NaN"):
        index.add([torch.full((4, 128), float("nan"))], ["new"])
    with pytest.raises(ValueError, match="already in the index"):
        index.add([docs[0]], [ids[0]])
    with pytest.raises(KeyError, match="not in the index"):
        index.delete(["missing"])
    with pytest.raises(ValueError, match="query_embeddings must have shape"):
        index.search(torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="n_query_probe >= 0"):
        index.search(queries[:1], n_query_probe=-1)
    with pytest.raises(ValueError, match="nbits"):
        PlaidIndex.build(docs[:50], ids[:50], nbits=3, device="cpu", show_progress=False)
    assert len(index) == len(docs), "failed adds must leave the index unchanged"


def test_variable_length_queries_as_a_list(corpus, index):
    _, queries, _ = corpus
    as_tensor = index.search(queries[:3, :20], k=5)
    as_list = index.search([q[:20].numpy() for q in queries[:3]], k=5)
    assert as_tensor[0] == as_list[0] and np.allclose(as_tensor[1], as_list[1])


def test_memory_budget_at_two_bits(corpus, index):
    """Residuals take dim * nbits / 8 bytes a token; codes 2; the inverted lists a few more."""
    assert index.residuals.shape[1] == 32 and index.codes.element_size() == 2
    centroid_bytes = index.codec.centroids.numel() * 4
    assert (index.memory_bytes() - centroid_bytes) / index.n_tokens < 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(corpus, index, tmp_path):
    _, queries, _ = corpus
    index.save(tmp_path / "plaid")
    on_gpu = PlaidIndex.load(tmp_path / "plaid", device="cuda")
    cpu_ids, cpu_scores = index.search(queries, k=10)
    gpu_ids, gpu_scores = on_gpu.search(queries, k=10)
    agreement = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu_ids, gpu_ids)])
    assert agreement >= 0.98 and np.allclose(cpu_scores, gpu_scores, atol=0.05)
