"""The harness's only API translation: the three GA kinds a v1.20 API server does not serve yet.

    batch/v1 CronJob                         <-> batch/v1beta1 CronJob          (GA in 1.21)
    policy/v1 PodDisruptionBudget            <-> policy/v1beta1 PodDisruptionBudget  (GA in 1.21)
    autoscaling/v2 HorizontalPodAutoscaler   <-> autoscaling/v2beta2 HorizontalPodAutoscaler  (GA in 1.23)

For the fields tapper and ZenML use, each pair has the same schema; the translation changes `apiVersion` (and the
request path) and nothing else. Where the GA version means something the older one cannot say, it refuses instead
of changing the meaning:
  * CronJob `spec.timeZone` (added in batch/v1, 1.24+) does not exist in v1beta1;
  * PodDisruptionBudget `spec.unhealthyPodEvictionPolicy` (policy/v1, 1.26+) does not exist in v1beta1, and an empty
    `spec.selector` selects every pod of the namespace in policy/v1 but none in v1beta1.
Everything else passes through untouched (the untranslated manifests are schema-checked with
`kubernetes-validate --strict` at the target version by tests/test_k8s.py).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Translation:
    group: str
    ga: str  # the version clients use
    served: str  # the version the v1.20 API server serves
    kind: str
    resource: str

    @property
    def ga_api_version(self) -> str:
        return f"{self.group}/{self.ga}"

    @property
    def served_api_version(self) -> str:
        return f"{self.group}/{self.served}"


TRANSLATIONS = (
    Translation("batch", "v1", "v1beta1", "CronJob", "cronjobs"),
    Translation("policy", "v1", "v1beta1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Translation("autoscaling", "v2", "v2beta2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
)


class TranslationError(ValueError):
    """A manifest uses something the served version cannot express."""


def _find(api_version: str, kind: str, served: bool) -> Translation | None:
    for t in TRANSLATIONS:
        version = t.served_api_version if served else t.ga_api_version
        if api_version == version and kind in (t.kind, t.kind + "List"):
            return t
    return None


def _check(doc: dict, t: Translation) -> None:
    spec = doc.get("spec") or {}
    name = (doc.get("metadata") or {}).get("name", "?")
    if t.kind == "CronJob" and "timeZone" in spec:
        raise TranslationError(f"CronJob {name}: spec.timeZone has no {t.served_api_version} equivalent")
    if t.kind == "PodDisruptionBudget":
        if "unhealthyPodEvictionPolicy" in spec:
            raise TranslationError(
                f"PodDisruptionBudget {name}: spec.unhealthyPodEvictionPolicy has no {t.served_api_version} equivalent"
            )
        selector = spec.get("selector")
        if selector is not None and not (selector.get("matchLabels") or selector.get("matchExpressions")):
            raise TranslationError(
                f"PodDisruptionBudget {name}: an empty selector selects every pod in policy/v1 "
                f"but none in {t.served_api_version}"
            )


def to_served(doc: dict) -> dict:
    """A manifest (or a List of them) as the v1.20 API server accepts it; other kinds come back unchanged."""
    if not isinstance(doc, dict):
        return doc
    t = _find(doc.get("apiVersion", ""), doc.get("kind", ""), served=False)
    if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        return {**doc, "items": [to_served(i) for i in doc["items"]]}
    if t is None:
        return doc
    out = copy.deepcopy(doc)
    if doc["kind"] == t.kind:
        _check(doc, t)
    else:
        for item in out.get("items") or []:
            _check(item, t)
            if item.get("apiVersion") == t.ga_api_version:
                item["apiVersion"] = t.served_api_version
    out["apiVersion"] = t.served_api_version
    return out


def from_served(doc: dict) -> dict:
    """An API response object (or List, or watch event) as a client of the GA version expects it."""
    if not isinstance(doc, dict):
        return doc
    if "type" in doc and isinstance(doc.get("object"), dict) and "apiVersion" not in doc:  # a watch event
        return {**doc, "object": from_served(doc["object"])}
    t = _find(doc.get("apiVersion", ""), doc.get("kind", ""), served=True)
    if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        return {**doc, "items": [from_served(i) for i in doc["items"]]}
    if t is None:
        return doc
    out = copy.deepcopy(doc)
    out["apiVersion"] = t.ga_api_version
    for item in out.get("items") or []:
        if item.get("apiVersion") == t.served_api_version:
            item["apiVersion"] = t.ga_api_version
    return out


_PATH = re.compile(
    r"^/apis/(?P<group>[a-z.]+)/(?P<version>v[0-9a-z]+)(?P<rest>(?:/namespaces/[^/]+)?/(?P<resource>[a-z]+)(?:/.*)?)$"
)
_WATCH_PATH = re.compile(
    r"^/apis/(?P<group>[a-z.]+)/(?P<version>v[0-9a-z]+)/watch(?P<rest>(?:/namespaces/[^/]+)?/(?P<resource>[a-z]+)(?:/.*)?)$"
)


def translate_path(path: str) -> str | None:
    """The served path for a GA path of a translated resource (query string untouched), else None."""
    base, sep, query = path.partition("?")
    for pattern, watch in ((_WATCH_PATH, "/watch"), (_PATH, "")):
        m = pattern.match(base)
        if not m:
            continue
        for t in TRANSLATIONS:
            if m["group"] == t.group and m["version"] == t.ga and m["resource"] == t.resource:
                return f"/apis/{t.group}/{t.served}{watch}{m['rest']}{sep}{query}"
        return None
    return None
