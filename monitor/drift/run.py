"""``monitor.drift(...)``: the whole check, stage by stage.

1. **Check the inputs** (:mod:`monitor.drift.load`, :mod:`monitor.drift.inputs`): models,
   adapters, prompt and text files, SAE, catalog and policies: all refused before any model
   work with one message naming the path and the problem.
2. **Base**: load it; answer the prompts (:mod:`monitor.drift.behaviour`); its greedy
   transcripts plus the texts become the fixed items of the teacher-forced pass
   (:mod:`monitor.drift.teacher`); measure them, and its own answers; the log-probabilities
   of any preference pairs (:mod:`monitor.drift.preference`).
3. **Each candidate, in order** (a checkpoint series): load it (adapters are merged over a
   fresh copy of the base), answer the same prompts, measure the same items and its own
   answers, the next-token KL against the base on the texts and the preference pairs'
   log-probabilities; then the statistics and verdicts
   (:mod:`monitor.drift.verdict`), and top contexts of the most-moved latents
   (:func:`monitor.explain.scan_latents`, under the candidate).

Progress goes to a callback ``progress(stage, advance, total)``; the library never prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.catalog import Catalog
from monitor.drift import behaviour as beh
from monitor.drift import direction as dr
from monitor.drift import load as ld
from monitor.drift import preference as pf
from monitor.drift import teacher as tf
from monitor.drift import verdict as vd
from monitor.drift.inputs import Prompt, default_prompts, default_texts, read_prompts, read_texts
from monitor.drift.result import CandidateDrift, DriftResult
from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy, PolicySet, load_policies
from monitor.sae import SAE

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Options:
    """Knobs of a drift check (defaults sized for the default model on two CPU cores)."""

    max_new_tokens: int = 64
    passes: tuple[str, ...] = ("greedy", "sampled")
    seed: int = 0
    fdr: float = 0.05
    batch_size: int = 32           # prompts per generate call; items per teacher-forced batch
    max_batch_tokens: int = 4096   # padded tokens per teacher-forced batch
    ctx: int = 256
    kl_tokens: int = 32
    lens_tokens: int = 8
    top_k: int = 10
    contexts: int = 3
    temperature: float = 0.8


@dataclass(frozen=True)
class Prepared:
    """Everything checked before any model work."""

    base: ld.ModelSource
    candidates: tuple[ld.ModelSource, ...]
    prompts: tuple[Prompt, ...]
    texts: tuple[str, ...]
    sae: SAE
    catalog: Catalog | None
    policy_set: PolicySet
    policy: CompiledPolicy
    directions: tuple[Path, ...] = ()
    preferences: tuple[Path, ...] = ()


def prepare(base: str | Path, candidates: Sequence[str | Path], *, prompts: str | Path | Sequence[Prompt] | None,
            texts: str | Path | Sequence[str] | None, sae: str | Path | SAE, catalog: str | Path | Catalog | None,
            policies: str | Path | Sequence[str | Path] | None,
            directions: Sequence[str | Path] | None = None,
            preferences: Sequence[str | Path] | None = None) -> Prepared:
    """Stage 1: resolve and check every input; raises :class:`~monitor.drift.load.DriftInputError`
    (or the policy/catalog/SAE error) before a single weight is read."""
    from monitor.catalog import load_catalog
    from monitor.sae import load_sae
    from monitor.policy import compile_policies
    from monitor.shipped import SHIPPED_CATALOG, shipped_policies_dir

    if not candidates:
        raise ld.DriftInputError("give at least one candidate model")
    prompt_list = (read_prompts(prompts) if isinstance(prompts, (str, Path))
                   else list(prompts) if prompts is not None else default_prompts())
    if not prompt_list:
        raise ld.DriftInputError("the prompt list is empty")
    text_list = (read_texts(texts) if isinstance(texts, (str, Path))
                 else list(texts) if texts is not None else default_texts())
    if not text_list:
        raise ld.DriftInputError("the text list is empty")
    base_src = ld.resolve(base)
    if base_src.kind == "adapter":
        raise ld.DriftInputError(f"{base_src.path}: the base must be a full model ('default' or a checkpoint "
                                 "directory); adapters are candidates applied over it")
    cand_srcs = tuple(ld.resolve(c) for c in candidates)
    for c in cand_srcs:
        ld.check_compatible(base_src, c)
    sae_obj = sae if isinstance(sae, SAE) else load_sae(sae)
    hidden = base_src.config.get("hidden_size")
    if hidden is not None and hidden != sae_obj.cfg.d_in:
        raise ld.DriftInputError(f"the SAE reads {sae_obj.cfg.d_in}-wide residuals but the base ({base}) has "
                                 f"hidden_size {hidden}; pass --sae for this model")
    if catalog is None and isinstance(sae, str) and sae == "default" and SHIPPED_CATALOG.is_file():
        catalog = SHIPPED_CATALOG
    cat = catalog if isinstance(catalog, Catalog) or catalog is None else load_catalog(catalog, d_sae=sae_obj.cfg.d_sae)
    if cat is not None:
        layer = sae_obj.hook_point.layer
        other = [e.name for e in cat.features if e.latent is None and cat.probe_layer(e.name) != layer]
        if other:
            raise ld.DriftInputError(f"catalog probes {', '.join(other)} read another layer than the SAE's "
                                     f"({layer}); a drift check measures at the SAE's layer only: pass a "
                                     "catalog without them (--catalog)")
    policy_set = load_policies(policies if policies is not None else shipped_policies_dir(), cat,
                               d_sae=sae_obj.cfg.d_sae)
    policy = compile_policies(policy_set, cat, d_sae=sae_obj.cfg.d_sae)
    pair_files = tuple(dr.check_pairs(p) for p in directions or ())
    for path in preferences or ():
        pf.complete_pairs(path)
    return Prepared(base_src, cand_srcs, tuple(prompt_list), tuple(text_list), sae_obj, cat, policy_set, policy,
                    pair_files, tuple(Path(p) for p in preferences or ()))


def feature_columns(prep: Prepared) -> tuple[tf.Columns, set[str], dict[int, str]]:
    """The catalog's features (latents, then probes), any raw latents the policies read, the
    names the policies watch, and latent -> catalog name."""
    latents: list[tuple[str, int]] = []
    probes: list[tuple[str, torch.Tensor, float]] = []
    if prep.catalog is not None:
        for entry in prep.catalog.features:
            if entry.latent is not None:
                latents.append((entry.name, int(entry.latent)))
            else:
                vec, bias = prep.catalog.probe(entry.name)
                probes.append((entry.name, vec.float(), float(bias)))
    known = {j for _, j in latents}
    for ref in prep.policy.features:
        if ref.kind == "latent" and ref.index is not None and ref.index not in known:
            latents.append((ref.label, int(ref.index)))
            known.add(int(ref.index))
    d_in = prep.sae.cfg.d_in
    w = torch.stack([p[1] for p in probes], dim=1) if probes else torch.zeros(d_in, 0)
    b = torch.tensor([p[2] for p in probes]) if probes else torch.zeros(0)
    columns = tf.Columns(tuple([n for n, _ in latents] + [p[0] for p in probes]), tuple(j for _, j in latents), w, b)
    watched = {ref.label for ref in prep.policy.features}
    names = {j: n for n, j in latents}
    return columns, watched, names


class _Stage:
    def __init__(self, progress: ProgressFn | None, name: str, total: int) -> None:
        self.progress, self.name, self.total = progress, name, total
        if progress is not None:
            progress(name, 0, total)

    def __call__(self, advance: int) -> None:
        if self.progress is not None:
            self.progress(self.name, advance, self.total)


class DriftCheck:
    """A base model measured once, against which candidates are compared one at a time.

    ``DriftCheck(prepared, ...)`` loads the base, answers the prompts and measures the fixed
    items (stage 2); :meth:`compare` runs stage 3 for one candidate. :func:`drift` is the
    one-call form; a long series (or a panel whose candidates are still being trained) can hold
    a check and call :meth:`compare` as each candidate becomes available. Not thread-safe.
    """

    def __init__(self, prep: Prepared, *, options: Options = Options(), progress: ProgressFn | None = None,
                 models: dict[str, tuple[Any, Any]] | None = None) -> None:
        self.prep, self.options, self.progress = prep, options, progress
        self.models = models or {}
        self.settings = vd.Settings(fdr=options.fdr, seed=options.seed, top_k=options.top_k)
        self.columns, self.watched, self.names = feature_columns(prep)
        self.shadow = beh.shadow_policy(prep.policy_set, prep.catalog, prep.sae.cfg.d_sae)
        self.base_model, self.tokenizer = self._get(prep.base)
        n_prompts = len(prep.prompts)
        self.base_beh = self._answer(self.base_model, "base")
        self.text_items = [tf.Item(tuple(self.tokenizer(t, add_special_tokens=True)["input_ids"][:options.ctx]), 1)
                           for t in prep.texts]
        self.items = [tf.Item(tuple(t.ids), len(t.prompt_ids)) for t in self.base_beh.transcripts[0]] + self.text_items
        self.text_rows = torch.arange(n_prompts, n_prompts + len(prep.texts))
        self.base_tf = self._measure(self.base_model, self.items, "base: teacher-forced")
        point = prep.sae.hook_point
        self.directions = [dr.pair_direction(self.base_model, self.tokenizer, point, path, ctx=options.ctx,
                                             batch_size=options.batch_size) for path in prep.directions]
        self.null_rows = dr.null_directions(prep.sae, self.base_tf, seed=options.seed)
        self.pair_sets = [pf.read_pair_set(path, self.tokenizer) for path in prep.preferences]
        self.base_pref = [self._logprob(self.base_model, ps, "base") for ps in self.pair_sets]

    def _get(self, source: ld.ModelSource) -> tuple[Any, Any]:
        return self.models.get(source.spec) or ld.load(source, self.prep.base)

    def _answer(self, model: Any, label: str) -> beh.Behaviour:
        o = self.options
        return beh.answer(model, self.tokenizer, self.prep.sae, self.shadow, self.prep.catalog, self.prep.prompts,
                          max_new_tokens=o.max_new_tokens, passes=o.passes, seed=o.seed, batch_size=o.batch_size,
                          temperature=o.temperature, columns=self.columns,
                          progress=_Stage(self.progress, f"{label}: answer", len(self.prep.prompts) * len(o.passes)))

    def _measure(self, model: Any, items: Sequence[tf.Item], label: str) -> tf.Measurement:
        return tf.measure(model, self.tokenizer, self.prep.sae, self.columns, items,
                          batch_size=self.options.batch_size, max_batch_tokens=self.options.max_batch_tokens,
                          ctx=self.options.ctx,
                          lens_tokens=self.options.lens_tokens, progress=_Stage(self.progress, label, len(items)))

    def _logprob(self, model: Any, pairs: pf.PairSet, label: str) -> torch.Tensor:
        return pf.sequence_logprob(model, self.tokenizer, pairs.items, ctx=self.options.ctx,
                                   max_batch_tokens=self.options.max_batch_tokens,
                                   progress=_Stage(self.progress, f"{label}: pairs {pairs.name}", len(pairs.items)))

    def compare(self, candidate: str | Path | ld.ModelSource) -> CandidateDrift:
        """Stage 3 for one candidate (checked against the base before it is loaded)."""
        prep, o, s = self.prep, self.options, self.settings
        source = candidate if isinstance(candidate, ld.ModelSource) else ld.resolve(candidate)
        ld.check_compatible(prep.base, source)
        started = time.perf_counter()
        cand_model, _ = self._get(source)
        label = source.label
        cand_beh = self._answer(cand_model, label)
        cand_tf = self._measure(cand_model, self.items, f"{label}: teacher-forced")
        kl_items, kl_pos = tf.next_token_kl(self.base_model, cand_model, self.tokenizer, self.text_items,
                                            n_tokens=o.kl_tokens, batch_size=o.batch_size,
                                            progress=_Stage(self.progress, f"{label}: KL", len(self.text_items)))
        ups, downs, n_up, n_down, t = vd.moved_latents(self.base_tf, cand_tf, self.names, s)
        null_t = vd.null_threshold(self.base_tf, cand_tf, t, self.columns.latents, s)
        assert self.base_beh.answer_features is not None and cand_beh.answer_features is not None
        feats = vd.features(self.columns, self.base_tf, cand_tf, self.base_beh.answer_features,
                            cand_beh.answer_features, null_t, s)
        fvu = vd.fvu(self.base_tf, cand_tf)
        warnings = []
        if fvu.worse:
            warnings.append(f"the SAE fits the candidate clearly worse (FVU {fvu.candidate:.3f} vs {fvu.base:.3f} "
                            "under the base): latent changes are suspect")
        ups, downs = _with_contexts(ups, downs, (cand_model, cand_tf), (self.base_model, self.base_tf),
                                    self.tokenizer, prep.sae, self.base_beh, prep.texts, o)
        return CandidateDrift(
            candidate=str(source.spec),
            rules=vd.rules([r.id for r in prep.policy.rules], [r.mode for r in prep.policy.rules],
                           self.base_beh.fired, cand_beh.fired, s),
            features=feats, latents_up=ups, latents_down=downs, n_latents_up=n_up, n_latents_down=n_down,
            null_t=null_t, lens=vd.lens(self.base_tf, cand_tf, self.text_rows, prep.sae.W_dec.detach(), self.columns,
                                        self.names, o.lens_tokens, o.top_k),
            fvu=fvu, kl=vd.kl_summary(kl_items, kl_pos, o.kl_tokens, s),
            drift_score=vd.drift_score(feats, self.watched, null_t),
            directions=tuple(dr.direction_shift(d, self.base_tf, cand_tf, self.null_rows, fdr=o.fdr, seed=o.seed)
                             for d in self.directions),
            preferences=tuple(pf.preference_shift(ps, lp, self._logprob(cand_model, ps, label), fdr=o.fdr, seed=o.seed)
                              for ps, lp in zip(self.pair_sets, self.base_pref)),
            warnings=tuple(warnings),
            responses=tuple(tuple(t.text for t in row) for row in cand_beh.transcripts),
            seconds=time.perf_counter() - started)

    def result(self, candidates: Sequence[CandidateDrift]) -> DriftResult:
        """The :class:`DriftResult` of the given compared candidates, in order."""
        o, prep = self.options, self.prep
        sae = prep.sae
        return DriftResult(base=str(prep.base.spec), candidates=tuple(candidates), fdr=o.fdr,
                           settings={"prompts": len(prep.prompts), "texts": len(prep.texts), "passes": list(o.passes),
                                     "max_new_tokens": o.max_new_tokens, "seed": o.seed, "kl_tokens": o.kl_tokens,
                                     "lens_tokens": o.lens_tokens, "sae": sae.cfg.hook_name or "<in memory>",
                                     "rules": len(prep.policy.rules), "features": len(self.columns.names)},
                           base_responses=tuple(tuple(t.text for t in row) for row in self.base_beh.transcripts),
                           prompts=tuple(p[-1]["content"] for p in prep.prompts))


def drift(base: str | Path = "default", candidates: Sequence[str | Path] = (), *,
          prompts: str | Path | Sequence[Prompt] | None = None, texts: str | Path | Sequence[str] | None = None,
          sae: str | Path | SAE = "default", catalog: str | Path | Catalog | None = None,
          policies: str | Path | Sequence[str | Path] | None = None,
          directions: Sequence[str | Path] | None = None, preferences: Sequence[str | Path] | None = None,
          options: Options = Options(),
          progress: ProgressFn | None = None, models: dict[str, tuple[Any, Any]] | None = None,
          on_candidate: Callable[[CandidateDrift], None] | None = None) -> DriftResult:
    """Compare ``candidates`` (in order) with ``base``; see the module docstring.

    Every input is checked before any model is loaded. ``models`` maps a model argument to an
    already loaded ``(model, tokenizer)`` (tests, notebooks). ``directions``: minimal-pair JSONL
    files whose concept directions to follow (:mod:`monitor.drift.direction`; none by default:
    on the fine-tune panel the vulnerable-minus-fixed direction did not separate unsafe from
    benign fine-tunes, see docs/drift.md). ``preferences``: minimal-pair JSONL files on which to
    measure the candidate's change of preference for the concept side (likelihood,
    :mod:`monitor.drift.preference`). ``on_candidate`` is called with
    each candidate's result as soon as it is ready (long series: save as you go).
    """
    prep = prepare(base, candidates, prompts=prompts, texts=texts, sae=sae, catalog=catalog, policies=policies,
                   directions=directions, preferences=preferences)
    check = DriftCheck(prep, options=options, progress=progress, models=models)
    results = []
    for source in prep.candidates:
        results.append(check.compare(source))
        if on_candidate is not None:
            on_candidate(results[-1])
    return check.result(results)


def _with_contexts(ups: tuple, downs: tuple, cand: tuple[Any, tf.Measurement], base: tuple[Any, tf.Measurement],
                   tokenizer: Any, sae: SAE, base_beh: beh.Behaviour, texts: Sequence[str],
                   options: Options) -> tuple[tuple, tuple]:
    """Attach top contexts (from :func:`monitor.explain.scan_latents`) to the most-moved
    latents: under the candidate for latents that rose, under the base for those that fell.

    The corpus is the base's greedy answers and the texts (the teacher-forced items). Only the
    items where a chosen latent peaked highest in the teacher-forced pass (twice as many as
    contexts are wanted, per latent) are scanned again, not the whole corpus."""
    from dataclasses import replace

    from monitor.explain import context_text, scan_latents

    if options.contexts <= 0:
        return ups, downs
    corpus = [t.text for t in base_beh.transcripts[0]] + list(texts)     # row i <-> teacher-forced item i
    out = []
    for shifts, (model, measured) in ((ups, cand), (downs, base)):
        chosen = [s.latent for s in shifts[:5]]
        if not chosen or not corpus:
            out.append(shifts)
            continue
        peaks = measured.latent_peak[:, chosen]                               # [items, chosen]
        top = torch.topk(peaks, k=min(2 * options.contexts, peaks.shape[0]), dim=0).indices.flatten().tolist()
        rows = sorted({i for i in top if corpus[i]})
        try:
            scans = scan_latents(model, tokenizer, sae, chosen, [corpus[i] for i in rows], n=options.contexts,
                                 window=8, ctx=min(options.ctx, 128), batch_size=max(1, options.batch_size // 2))
        except MonitorError:
            out.append(shifts)
            continue
        out.append(tuple(replace(s, contexts=tuple(context_text(c) for c in scans[s.latent].contexts))
                         if s.latent in scans else s for s in shifts))
    return out[0], out[1]
