"""Building and publishing the trainer's engines: a full round's (publish) and any model's (_build), with the
registry's garbage collection and the build's spans. A mixin of trainer.loop.Trainer, whose state it uses."""

from __future__ import annotations

import logging

import numpy as np

from trainer import ema
from trainer.examples import left_pad
from trainer.export.build import BuildFailed, BuildInfo, build_engine
from trainer.export.compile import CompileOptions
from trainer.model import TwoTower
from contracts.registry import Registry

log = logging.getLogger("livetower.trainer")


class Publishing:
    def publish(self, metrics: dict[str, float], gate: str) -> int:
        """Build an engine from the current model (its weight average, with ema_epochs) and publish it; returns
        its version (0 on failure)."""
        st = self.state
        model = ema.averaged(self.model, self.opt)
        info = BuildInfo(parent=max(st.published_version, self.read_ahead.last_version),
                         stream_offsets=dict(st.offsets), watermark_ms=st.watermark_ms,
                         trained_events=st.trained_events,
                         eval_metrics={**metrics, "gate_passed": float(gate == "passed")})
        version = self._build(model, info)
        if not version:
            return 0
        st.published_version = version
        st.model_published = True
        st.published_models[version] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        keep = {version, self.read_ahead.base_of(self.registry.read_rollout().stable)}
        st.published_models = {v: m for v, m in st.published_models.items() if v in keep}
        st.published_vocab_epochs[version] = st.vocab_epoch
        st.published_vocab_epochs = {v: e for v, e in st.published_vocab_epochs.items() if v in keep}
        self._checkpoint()
        return version

    def _build(self, model: TwoTower, info: BuildInfo, n_items: int | None = None) -> int:
        """Build an engine of `model` serving the first n_items of the vocabulary (None: all) and publish it, then
        collect old engines; its version, or 0 when the build was refused or failed (logged; the next round builds
        again)."""
        st = self.state
        options = CompileOptions(backend=self.cfg.backend,
                                 inductor_cache_dir=str(self.cfg.inductor_cache_dir) if self.cfg.inductor_cache_dir else None)
        T = model.cfg.max_history
        users = sorted(st.user_seqs)
        pick = np.random.default_rng(st.step).permutation(len(users))[:1000]
        queries_QT = np.stack([left_pad(st.user_seqs[users[i]], T) for i in pick]) if len(pick) else None
        registry = self.registry if self.tracing.tracer is None else _TracedPublish(self.registry, self._span)
        with self._span("build", backend=self.cfg.backend) as build_span:
            def progress(message: str) -> None:
                log.info("%s", message)
                if build_span is not None:
                    build_span.add_event(message)

            try:
                ids = list(self.vocab.ids)[:n_items]
                manifest = build_engine(model, ids, st.item_counts, registry, info, options,
                                        parity_tolerance=self.cfg.parity_tolerance, ann=self.cfg.ann,
                                        ann_queries_QT=queries_QT, refit=self.cfg.refit,
                                        signing_key=self.cfg.signing_key, user_catalog=self.catalog,
                                        progress=progress)
            except BuildFailed as e:
                log.error("engine build refused: %s", e)
                if build_span is not None:
                    build_span.set_attribute("build.refused", str(e))
                return 0
            except Exception as e:  # a compiler/export failure must not crash-loop the trainer; the next round retries
                log.exception("engine build failed; training goes on and the next round builds again")
                if build_span is not None:
                    build_span.record_exception(e)
                return 0
        version = int(manifest.version)
        if self.cfg.keep_engines:
            removed = self.registry.collect_garbage(self.cfg.keep_engines, protected={version})
            if removed:
                log.info("registry gc: removed engines %s", removed)
        self.metrics.published_version.set(version)
        return version


class _TracedPublish:
    """The registry as build_engine sees it, with its atomic publish in a "publish" span (tracing on only)."""

    def __init__(self, registry: Registry, span) -> None:
        self._registry, self._span = registry, span

    def publish(self, *args, **kwargs) -> int:
        with self._span("publish"):
            return self._registry.publish(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._registry, name)
