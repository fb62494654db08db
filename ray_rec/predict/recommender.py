"""The one batched prediction API: raw ids in, scores and top-k out.

`Recommender.predict` takes `Query` objects (item indices) and is what every online caller runs:
``load_model(...).recommend/score``, and the Serve replica for each batch of HTTP requests. A
history with no known item tells the model nothing; it is answered by popularity here, once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray_rec.config import ModelConfig
from ray_rec.device import device_name, resolve_device, to_device
from ray_rec.model.artifact import ArtifactError, LoadedArtifact, read_artifact
from ray_rec.model.interest_model import InterestModel
from ray_rec.predict import explain as explain_api
from ray_rec.predict import ranking
from ray_rec.predict.inputs import check_rows, click_time_buckets, pad_rows, window
from ray_rec.vocab import RawId, Vocabulary

logger = logging.getLogger(__name__)

POPULARITY = "popularity"  # the fallback's name, as answers and the HTTP API report it


@dataclass
class Query:
    """One request on item indices: ``candidates`` to score, or else the top ``k`` of the catalog."""

    history: list[int]  # every known click, oldest first (the model reads the last history_len)
    candidates: list[int] | None = None  # indices to score; 0 = an unknown candidate (scored None)
    k: int = 0
    exclude: bool = True  # leave the history's items out of the top-k
    time_buckets: list[int] | None = None  # one per history click, when the request sent click times
    explain: int = 0  # name this many clicks per returned item or candidate (0: no explanation)


@dataclass
class Answer:
    """What a `Query` gets: ``scores`` one per candidate (None: unknown), or the top-k ``items``
    (indices, best first) with their ``scores``; ``fallback`` names how a history with no known
    item was answered (``popularity``: training click counts), None when the model answered."""

    scores: Sequence[float | None]
    items: list[int] | None = None
    fallback: str | None = None
    # With ``Query.explain``: per returned item or candidate, its clicks as (index in
    # ``Query.history``, signed share), largest contribution first; empty for an unknown candidate.
    reasons: list[list[tuple[int, float]]] | None = None


class Recommender:
    """A loaded model with the public API on raw item ids.

    Example:
        >>> rec = load_model("out/model")  # doctest: +SKIP
        >>> rec.recommend([[12, 7, 3]], k=5)  # doctest: +SKIP
        [[(41, 7.1), (9, 6.8), ...]]
    """

    def __init__(self, model: InterestModel, vocab: Vocabulary, meta: dict[str, Any], uri: str,
                 device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.meta = meta
        self.uri = uri
        self.version: str = meta["version"]
        self.loaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._by_clicks: np.ndarray | None = None  # item positions, most clicked first (on first use)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def info(self) -> dict[str, Any]:
        """What this model is and where it came from: version, location, creation time, and the
        run's ``lineage`` (configuration, data set, code and versions, seeds, workers, device,
        tracking; None for artifacts written before it was recorded) and ``training`` summary."""
        return {"version": self.version, "uri": self.uri, "created": self.meta.get("created"),
                "lineage": self.meta.get("lineage"), "training": self.meta.get("training")}

    # ---------------------------------------------------------------------------- the batched API

    @torch.inference_mode()
    def predict(self, queries: Sequence[Query], explain_method: str = explain_api.DEFAULT_METHOD) -> list[Answer]:
        """Answer score and recommend queries together: one encoding of the histories per block of
        `ranking.BLOCK_ROWS`, the catalog scored in `ranking.top_k`'s bounded blocks, on the
        model's device (each block's inputs go there in one `to_device`). Queries that ask for an
        explanation get their answers' reasons by ``explain_method`` (`ray_rec.predict.explain`),
        all of them in one pass."""
        if any(q.explain for q in queries):
            explain_api.check_method(explain_method, self.model)
        answers: list[Answer | None] = [None if q.history else self._fallback(q) for q in queries]
        modelled = [r for r, q in enumerate(queries) if q.history]
        length = self.config.history_len
        for start in range(0, len(modelled), ranking.BLOCK_ROWS):
            block = [queries[r] for r in modelled[start : start + ranking.BLOCK_ROWS]]
            # Queries without click times read every gap as unknown (bucket 0), as a block of none does.
            times = [q.time_buckets or [0] * len(q.history) for q in block] if any(q.time_buckets for q in block) else None
            scored = [i for i, q in enumerate(block) if q.candidates is not None]
            ranked = [i for i, q in enumerate(block) if q.candidates is None]
            cands = [block[i].candidates or [] for i in scored]
            inputs = {"items": window([q.history for q in block], length)}
            if times is not None:
                inputs["time_buckets"] = window(times, length)
            if scored:
                inputs["candidates"], inputs["scored"] = pad_rows(cands), torch.tensor(scored)
            if ranked:
                inputs["exclude"] = pad_rows([block[i].history if block[i].exclude else [] for i in ranked])
                inputs["ranked"] = torch.tensor(ranked)
            inputs = to_device(inputs, self.device)
            u = ranking.interests(self.model, inputs["items"], inputs.get("time_buckets"))  # (B, D)
            if scored:
                rows = self.model.candidate_scores(u[inputs["scored"]], inputs["candidates"]).cpu().tolist()
                for i, c, row in zip(scored, cands, rows):
                    answers[modelled[start + i]] = Answer([s if idx else None for s, idx in zip(row, c)])
            if ranked:
                ids, scores = ranking.top_k(self.model, u[inputs["ranked"]], max(block[i].k for i in ranked), inputs["exclude"])
                for i, row_ids, row_scores in zip(ranked, ids.cpu().tolist(), scores.cpu().tolist()):
                    pairs = [(idx, s) for idx, s in zip(row_ids[: block[i].k], row_scores[: block[i].k]) if s != float("-inf")]
                    answers[modelled[start + i]] = Answer([s for _, s in pairs], [idx for idx, _ in pairs])
        self._explain(queries, answers, explain_method)  # type: ignore[arg-type]  # every slot is filled above
        return answers  # type: ignore[return-value]

    def _explain(self, queries: Sequence[Query], answers: list[Answer], method: str) -> None:
        """Fill the reasons of the answers whose query asks for them (a popularity answer has none)."""
        asked = [r for r, q in enumerate(queries) if q.explain]
        jobs = []
        for r in asked:
            q, a = queries[r], answers[r]
            targets = a.items if a.items is not None else list(q.candidates or [])
            jobs.append(explain_api.Job(q.history if a.fallback is None else [], q.time_buckets, targets, q.explain))
        for r, job, named in zip(asked, jobs, explain_api.explain(self.model, jobs, method)):
            first = len(job.history) - min(len(job.history), self.config.history_len)
            answers[r].reasons = [[(first + j, share) for j, share in row] if target else []
                                  for target, row in zip(job.targets, named)]

    def _fallback(self, query: Query) -> Answer:
        """A query whose history holds no known item: candidates scored by their training click
        counts, or the most clicked items."""
        if query.candidates is not None:
            return Answer([self.clicks([i])[0] if i else None for i in query.candidates], fallback=POPULARITY)
        top = self.popular_indices(query.k)
        return Answer(list(self.clicks(top)), top, fallback=POPULARITY)

    # ---------------------------------------------------------------------------- raw ids

    def lookup(
        self, history: Sequence[RawId], stamps: Sequence[float] | None = None, name: str = "timestamps"
    ) -> tuple[list[int], list[RawId], list[int] | None]:
        """One raw history -> the indices of its known items, its unknown ids, and, given its
        click times (checked; errors name them ``name``), the known items' time buckets: None
        without times or for a model that reads no time."""
        index = self.vocab.indices(history)
        known = [i for i in index if i is not None]
        unknown = [raw for raw, i in zip(history, index) if i is None]
        if stamps is None:
            return known, unknown, None
        buckets = click_time_buckets(stamps, len(history), self.config.time_buckets, name)
        if self.model.features.time is None:
            return known, unknown, None
        return known, unknown, [int(b) for b, i in zip(buckets, index) if i is not None]

    def _queries(self, rows: list[list[RawId]], timestamps: Iterable[Iterable[float]] | None,
                 **fields: Any) -> list[Query]:
        """Queries from histories already checked by `check_rows`."""
        stamps = None if timestamps is None else check_rows("timestamps", timestamps, "click times")
        if stamps is not None and len(stamps) != len(rows):
            raise ValueError(f"{len(rows)} histories but {len(stamps)} timestamp lists")
        out = []
        for i, raw in enumerate(rows):
            known, _, buckets = self.lookup(raw, None if stamps is None else stamps[i], f"timestamps[{i}]")
            out.append(Query(known, time_buckets=buckets, **fields))
        return out

    def score(
        self,
        histories: list[list[RawId]],
        candidates: list[list[RawId]],
        timestamps: list[list[float]] | None = None,
        explain: bool = False,
        explain_top: int = explain_api.DEFAULT_TOP,
        explain_method: str = explain_api.DEFAULT_METHOD,
    ) -> list[list[Any]]:
        """Relevance of each candidate to each history (higher = more likely the next click).

        Unknown candidates get None. ``histories`` and ``candidates`` are parallel lists. A history
        with no known item scores its candidates by their training click counts, as ``recommend``
        ranks for it. ``timestamps``: optional, as in ``recommend``. With ``explain``, each score
        comes as (score, reasons), as in ``recommend``; an unknown candidate has no reasons.
        """
        top = explain_api.clicks_asked(explain, explain_top)
        rows = check_rows("histories", histories)
        queries = self._queries(rows, timestamps, explain=top)
        index = [[self.vocab.index_of(raw) or 0 for raw in row] for row in check_rows("candidates", candidates)]
        if len(queries) != len(index):
            raise ValueError(f"{len(queries)} histories but {len(index)} candidate lists")
        for query, row in zip(queries, index):
            query.candidates = row
        answers = self.predict(queries, explain_method)
        if not top:
            return [list(answer.scores) for answer in answers]
        return [list(zip(a.scores, self.raw_reasons(a, raw))) for a, raw in zip(answers, rows)]

    def recommend(
        self,
        histories: list[list[RawId]],
        k: int = 10,
        exclude_seen: bool = True,
        timestamps: list[list[float]] | None = None,
        explain: bool = False,
        explain_top: int = explain_api.DEFAULT_TOP,
        explain_method: str = explain_api.DEFAULT_METHOD,
    ) -> list[list[tuple[Any, ...]]]:
        """The top-k items of the catalog for each history, as (raw id, score), best first.

        A history with no known item (empty, or only ids the model never saw) tells the model
        nothing: it gets the most clicked items instead, scored by their training click counts
        (``popular``; the HTTP API marks such answers ``"fallback": "popularity"``).

        ``timestamps``: optional click times, one list per history, one epoch second (or
        millisecond) per item, oldest first. A model trained on data with times reads the time
        between clicks as it did in training; without them every gap reads as unknown.

        ``explain``: each item comes as (raw id, score, reasons): the ``explain_top`` history clicks
        that raised its score most, as `ray_rec.predict.explain.Reason` (raw id, position in the history, signed
        share), by ``explain_method`` (see `ray_rec.predict.explain`; a popularity answer has none).
        """
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        top = explain_api.clicks_asked(explain, explain_top)
        rows = check_rows("histories", histories)
        answers = self.predict(self._queries(rows, timestamps, k=k, exclude=exclude_seen, explain=top), explain_method)
        if not top:
            return [[(self.vocab.raw_id(i), s) for i, s in zip(a.items or [], a.scores)] for a in answers]  # type: ignore[misc]
        return [[(self.vocab.raw_id(i), s, why) for i, s, why in zip(a.items or [], a.scores, self.raw_reasons(a, raw))]
                for a, raw in zip(answers, rows)]

    def raw_reasons(self, answer: Answer, history: Sequence[RawId]) -> list[list[explain_api.Reason]]:
        """``answer.reasons`` (on the known clicks of ``history``) as raw ids and positions in ``history``."""
        known = [p for p, i in enumerate(self.vocab.indices(history)) if i is not None]
        return [[explain_api.Reason(history[known[j]], known[j], share) for j, share in row] for row in answer.reasons or []]

    def clicks(self, index: Sequence[int]) -> list[float]:
        """Training click counts of item indices (0 for padding)."""
        return [float(self.vocab.counts[i - 1]) if i else 0.0 for i in index]

    def popular_indices(self, k: int) -> list[int]:
        """The indices of the k most clicked items of the training data, most clicked first."""
        if self._by_clicks is None:  # ties keep the vocabulary's order
            self._by_clicks = np.argsort(-np.asarray(self.vocab.counts, dtype=np.float64), kind="stable")
        return [int(i) + 1 for i in self._by_clicks[:k]]

    def popular(self, k: int) -> list[tuple[RawId, float]]:
        """The k most clicked items of the training data, as (raw id, click count), most clicked first."""
        top = self.popular_indices(k)
        return [(self.vocab.raw_id(i), c) for i, c in zip(top, self.clicks(top))]


def load_model(uri: str, max_model_mb: float | None = None, device: str | torch.device = "auto") -> Recommender:
    """Load an artifact from a local folder or an s3:// URI (`ray_rec.model.artifact.read_artifact`
    checks size, shapes, hash and finite weights) and make one trial prediction.

    ``device``: where the model scores and ranks: ``auto`` (the first GPU this process sees, else
    the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Artifacts are stored on the CPU and load on any.

    Raises:
        DeviceError: ``device`` names a GPU this process does not see.
        ArtifactError: the folder is missing, incomplete, corrupt, too large, of another format, or
            its model does not answer with finite scores.
    """
    target = resolve_device(device)  # before the download: a wrong device fails at once
    loaded: LoadedArtifact = read_artifact(uri, max_model_mb)
    rec = Recommender(loaded.model, loaded.vocab, loaded.meta, uri, target)
    first = rec.vocab.raw_id(1)
    top = rec.recommend([[first]], k=min(10, len(rec.vocab)), exclude_seen=False)[0]
    scores = [s for _, s in top] + [s for s in rec.score([[first]], [[first]])[0] if s is not None]
    if not scores or not np.isfinite(scores).all():  # a model that answers NaN must not replace a working one
        raise ArtifactError(f"{uri}: a trial prediction gave {scores[:3]}: the model does not answer with finite scores")
    logger.info("loaded model %s from %s (%d items) on %s", rec.version, uri, len(rec.vocab), device_name(rec.device))
    return rec
