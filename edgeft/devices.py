"""Device profiles (``targets/devices/*.toml``, data only) and what an artifact would do on one.

A profile records a device's cores and the thread count to use, its instruction sets, total RAM and
the RAM one app may use, and memory bandwidth: theoretical, measured read (where published) and
the *effective* bandwidth decode reaches. Every figure carries its source in the file; figures that
are assumptions say so.

``edgeft bench --device NAME`` measures on this machine with the device's thread count, then adds a
**projection** for the device, kept apart from the measurements everywhere it appears:

* fits — RAM needed (the peak RSS measured here at the bench context, plus the KV cache for any
  longer context) against the app's usable RAM;
* decode tok/s — the per-token floor model of :mod:`edgeft.decode_model`: each token costs a fixed
  ``t0`` plus its weight bytes ÷ a bandwidth. A profile may carry fits (``[[decode_fit]]``: ``t0``
  and bandwidth for one runtime and thread count, the runs they came from and the residuals),
  published or made with ``edgeft devices calibrate``; without one for the profile's thread count
  the projection is a range from a ``t0`` prior (``per_token_ms_prior``, sourced) up to the
  bandwidth-only ceiling. Every decode projection is a range with its basis. Prefill is
  compute-bound and is not projected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .build_layout import BENCH_PREFIX
from .config import BENCH_CONTEXT
from .decode_model import DecodeFit, describe_range, fit_from_table, project_decode
from .errors import ConfigError, EdgeftError
from .formats import FORMATS, get_format
from .loading import read_toml
from .stage import read_manifest
from .targets import targets_dir


@dataclass(frozen=True)
class DeviceProfile:
    key: str
    name: str
    kind: str
    cores: str
    threads: int
    isa: tuple[str, ...]
    ram_gb: float
    app_ram_gb: float
    app_ram_source: str
    bandwidth_theoretical_gb_s: float
    bandwidth_theoretical_source: str
    effective_bandwidth_gb_s: float
    effective_bandwidth_source: str
    formats: tuple[str, ...]
    bandwidth_measured_gb_s: float | None = None
    bandwidth_measured_source: str | None = None
    per_token_ms_prior: float | None = None  # t0 assumed where no fit applies (see decode_model)
    per_token_ms_prior_source: str | None = None
    based_on: str | None = None  # the profile a calibrated one was made from
    decode_fit: tuple[DecodeFit, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return _lists(asdict(self))

    def fit_for(self, runtime: str | None, threads: int | None = None) -> DecodeFit | None:
        """The fit for ``runtime`` at ``threads`` (default: the profile's thread count), if any."""
        want = self.threads if threads is None else threads
        return next((f for f in self.decode_fit if f.runtime == runtime and f.threads == want), None)


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


_OPTIONAL = {
    "bandwidth_measured_gb_s",
    "bandwidth_measured_source",
    "per_token_ms_prior",
    "per_token_ms_prior_source",
    "based_on",
    "decode_fit",
}


def devices_dir() -> Path:
    return targets_dir() / "devices"


def _load(path: Path) -> DeviceProfile:
    raw = read_toml(path, "device profile")
    known = {f.name for f in fields(DeviceProfile)} - {"key"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected {', '.join(sorted(known))}")
    missing = known - _OPTIONAL - set(raw)
    if missing:
        raise ConfigError(f"{path}: missing key {sorted(missing)[0]!r}")
    values: dict[str, Any] = {"key": path.stem}
    for f in fields(DeviceProfile):
        if f.name == "key" or f.name not in raw:
            continue
        v = raw[f.name]
        if f.name == "decode_fit":
            if not isinstance(v, list):
                raise ConfigError(f"{path}: decode_fit: expected [[decode_fit]] tables, got {v!r:.60}")
            v = tuple(fit_from_table(t, f"{path}: decode_fit[{i}]") for i, t in enumerate(v))
            seen = [(x.runtime, x.threads) for x in v]
            if len(set(seen)) < len(seen):
                twice = next(k for k in seen if seen.count(k) > 1)
                raise ConfigError(f"{path}: decode_fit: two fits for {twice[0]} at {twice[1]} threads; keep one")
        elif f.name == "per_token_ms_prior":
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < float("inf"):
                raise ConfigError(f"{path}: per_token_ms_prior: expected milliseconds (a number >= 0), got {v!r}")
            v = float(v)
        elif f.name in ("isa", "formats"):
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{path}: {f.name}: expected a list of strings, got {v!r}")
            v = tuple(v)
            unknown = [x for x in v if x not in FORMATS] if f.name == "formats" else []
            if unknown:
                raise ConfigError(
                    f"{path}: formats: unknown format {unknown[0]!r}; expected names from {', '.join(FORMATS)}"
                )
        elif f.name == "threads":
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{path}: threads: expected a positive integer, got {v!r}")
        elif f.name.endswith(("_gb", "_gb_s")):
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{path}: {f.name}: expected a positive number, got {v!r}")
            v = float(v)
        elif not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{path}: {f.name}: expected a non-empty string, got {v!r}")
        values[f.name] = v
    profile = DeviceProfile(**values)
    if (profile.per_token_ms_prior is None) != (profile.per_token_ms_prior_source is None):
        raise ConfigError(
            f"{path}: per_token_ms_prior and per_token_ms_prior_source go together (a figure and its source)"
        )
    if profile.app_ram_gb > profile.ram_gb:
        raise ConfigError(f"{path}: app_ram_gb: {profile.app_ram_gb} is more than ram_gb {profile.ram_gb}")
    return profile


def available_devices() -> dict[str, DeviceProfile]:
    return {p.stem: _load(p) for p in sorted(devices_dir().glob("*.toml"))}


def get_device(name: str) -> DeviceProfile:
    """A profile by short name (``rpi5``) or by the path of a profile TOML file."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--device {name}: profile file not found")
        return _load(path)
    devices = available_devices()
    if name not in devices:
        raise ConfigError(f"--device {name!r}: unknown device; known: {', '.join(devices)} (or a .toml path)")
    return devices[name]


def device_file(name: str) -> Path:
    """The TOML file a profile name (or path) given to :func:`get_device` comes from."""
    return Path(name) if name.endswith(".toml") else devices_dir() / f"{name}.toml"


def project(
    profile: DeviceProfile,
    fmt: str,
    bytes_per_token: int,
    peak_rss_bytes: int,
    kv_bytes_per_token: int | None,
    measured_context: int,
    context: int,
) -> dict[str, Any]:
    """What one artifact would need and do on ``profile`` (every number here is a projection).

    ``decode_tok_s`` is the estimate; ``decode_tok_s_low``/``_high`` the range and ``decode_basis``
    what it rests on (``fit``, ``prior``, ``ceiling``; see :mod:`edgeft.decode_model`)."""
    extra_kv = max(0, context - measured_context) * (kv_bytes_per_token or 0)
    need = peak_rss_bytes + extra_kv
    app_ram = int(profile.app_ram_gb * 1e9)
    supported = fmt in profile.formats
    runtime = _runtime(fmt)
    fit = profile.fit_for(runtime)
    decode = project_decode(bytes_per_token, fit, profile.effective_bandwidth_gb_s, profile.per_token_ms_prior)
    return {
        "projected": True,
        "format_supported": supported,
        "context_tokens": context,
        "ram_needed_bytes": need,
        "app_ram_bytes": app_ram,
        "fits": supported and need <= app_ram,
        "decode_tok_s": decode["estimate"],
        "decode_tok_s_low": decode["low"],
        "decode_tok_s_high": decode["high"],
        "decode_tok_s_ceiling": decode["ceiling"],
        "decode_basis": decode["basis"],
        "decode_model": decode,
        "prefill_tok_s": None,  # compute-bound: not projected from bandwidth
        "method": f"decode {describe_range(decode)} tok/s: {decode_basis_text(profile, runtime, decode, bytes_per_token, fit)}; "
        "RAM = peak RSS measured here + KV cache beyond the measured context",
    }


def _runtime(fmt: str) -> str | None:
    try:
        return get_format(fmt).RUNTIME
    except EdgeftError:
        return None


def decode_basis_text(
    profile: DeviceProfile, runtime: str | None, decode: dict[str, Any], bytes_per_token: int, fit: DecodeFit | None
) -> str:
    """One sentence on what a decode projection rests on."""
    mb = bytes_per_token / 1e6
    if decode["basis"] == "fit" and fit is not None:
        lo, hi = fit.sizes
        text = (
            f"1 / ({fit.per_token_ms:.2f} ms + {mb:.1f} MB ÷ {fit.bandwidth_gb_s:.2f} GB/s), fitted for {runtime} at "
            f"{fit.threads} threads on {len(fit.runs)} runs of {lo / 1e6:.0f}–{hi / 1e6:.0f} MB ({fit.source.split(': ')[0]}); "
            f"band ±{decode['uncertainty_pct']:.0f}% per token (the fit's worst residual or the runs' spread)"
        )
        if decode["extrapolated"]:
            text += ", doubled: this size is outside the fitted ones"
        return text
    others = sorted({f.threads for f in profile.decode_fit if f.runtime == runtime})
    no_fit = f"no fit for {runtime} at {profile.threads} threads" + (
        f" (fits exist at {', '.join(map(str, others))} threads)" if others else ""
    )
    if decode["basis"] == "prior":
        return (
            f"from 1 / ({profile.per_token_ms_prior:g} ms + {mb:.1f} MB ÷ {profile.effective_bandwidth_gb_s:g} GB/s) "
            f"(per-token cost: {profile.per_token_ms_prior_source}) up to bandwidth alone, a ceiling; {no_fit}"
        )
    return f"bandwidth alone ({profile.effective_bandwidth_gb_s:g} GB/s ÷ {mb:.1f} MB), a ceiling; {no_fit} and no per-token prior"


def device_projection(
    device: DeviceProfile, measured: list[tuple[str, str, dict[str, Any]]], context: int
) -> dict[str, Any]:
    """Each artifact on a device profile: fit and decode speed, projected (never a measurement)."""
    rows = {}
    for name, _, results in measured:
        art, perf = results["artifact"], results["performance"]
        fmt = get_format(art["format"])  # recorded by the bench from the registry
        try:
            kv = fmt.kv_bytes_per_token(Path(art["path"]))
        except EdgeftError:
            kv = None
        lat = perf["latency"]
        measured_ctx = BENCH_CONTEXT if fmt.KV_CACHE_AT_OPEN else lat["prompt_tokens"] + lat["decode_tokens"]
        rows[name] = project(
            device,
            art["format"],
            results["roofline"]["bytes_per_token"],
            perf["peak_rss_bytes"],
            kv,
            measured_ctx,
            context,
        ) | {"kv_bytes_per_token": kv, "measured_decode_tok_s_here": lat["decode_tok_s"]["median"]}
    return {"profile": device.as_dict(), "projected": True, "context_tokens": context, "targets": rows}


def recommend(
    build_dir: Path, device: DeviceProfile, max_kld: float | None, min_tok_s: float | None, context: int
) -> dict[str, Any]:
    """Among a build's benchmarked targets, the smallest that the device runs, that fits, is within
    ``max_kld`` (measured here) and reaches ``min_tok_s`` decode (projected); ties go to the faster."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise ConfigError(f"--build {build_dir}: no such build folder")
    measured = []
    for folder in sorted(build_dir.glob(f"{BENCH_PREFIX}*")):
        results = (read_manifest(folder) or {}).get("results")
        if results and read_manifest(folder).get("stage") == "bench" and "roofline" in results:
            measured.append((folder.name.removeprefix(BENCH_PREFIX), results["artifact"]["file_type"], results))
    if not measured:
        raise ConfigError(f"--build {build_dir}: no benchmarked targets; run `edgeft build --target ...` first")
    projection = device_projection(device, measured, context)
    rows = []
    for name, quant, results in measured:
        p = projection["targets"][name]
        kld = results["fidelity"]["kl_divergence_mean"]
        reasons = []
        if not p["format_supported"]:
            reasons.append(f"{results['artifact']['format']} not supported")
        elif not p["fits"]:
            reasons.append("does not fit")
        if max_kld is not None and kld > max_kld:
            reasons.append(f"KLD {kld:.4f} > {max_kld:g}")
        if min_tok_s is not None and (p["decode_tok_s"] or 0) < min_tok_s:
            reasons.append(f"decode {p['decode_tok_s'] or 0:.1f} < {min_tok_s:g} tok/s (projected {p['decode_basis']})")
        rows.append(
            {
                "target": name,
                "quant": quant,
                "size_bytes": results["artifact"]["size_bytes"],
                "kl_divergence_mean": kld,
                "task_accuracy": results["fidelity"].get("task_accuracy_artifact"),
                "decode_tok_s_measured_here": results["performance"]["latency"]["decode_tok_s"]["median"],
                "timed": {k: results["performance"].get(k) for k in ("run_id", "timed_at", "machine")},
                "decode_tok_s_projected": p["decode_tok_s"],
                "decode_tok_s_projected_low": p["decode_tok_s_low"],
                "decode_tok_s_projected_high": p["decode_tok_s_high"],
                "decode_basis": p["decode_basis"],
                "ram_needed_bytes_projected": p["ram_needed_bytes"],
                "fits_projected": p["fits"],
                "meets": not reasons,
                "why_not": "; ".join(reasons),
            }
        )
    ok = [r for r in rows if r["meets"]]
    choice = min(ok, key=lambda r: (r["size_bytes"], -(r["decode_tok_s_projected"] or 0)))["target"] if ok else None
    rows.sort(key=lambda r: r["size_bytes"])
    return {"device": device.key, "projected": True, "context_tokens": context, "choice": choice, "rows": rows}
