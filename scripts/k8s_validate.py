"""Validate Kubernetes manifests offline and strictly (`make k8s-validate`).

- Core objects: against the Kubernetes schemas of each version given
  (kubernetes-validate, strict: a field the schema does not name is an error).
- Custom resources (JobSet, TrainJob, (Cluster)TrainingRuntime): against the
  openAPIV3Schema of their CRD, found by group, version and kind in --crds.
  The API server would prune unknown fields silently, so here every object
  schema that names its properties rejects any other (unless the CRD marks it
  x-kubernetes-preserve-unknown-fields). CEL rules are not evaluated.
  Their metadata is checked as core ObjectMeta, and each Job template inside
  them (a JobSet's replicated Jobs, a runtime's) as a core batch/v1 Job, pod
  template included, for every version.
- --emit-jobs DIR writes those Job templates out as Job manifests, so that a
  policy scanner that knows only core kinds sees the pods they make.

Exit 0 when all is valid, else 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml


def load(path: Path) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def strict(schema: dict) -> dict:
    """The schema with additionalProperties: false wherever properties are
    named and nothing else is allowed."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache  # the CRD files are ~2.6 MB of YAML: parsed once per process
def crd_schemas(directory: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict schema, for every CRD in `directory`."""
    schemas = {}
    for path in sorted(directory.glob("*.yaml")):
        for crd in load(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schema = strict(version["schema"]["openAPIV3Schema"])
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def job_templates(doc: dict) -> list[tuple[str, dict]]:
    """(path, JobTemplateSpec) of each replicated Job in a JobSet or a runtime."""
    spec = doc.get("spec", {})
    if doc["kind"] in ("ClusterTrainingRuntime", "TrainingRuntime"):
        spec, prefix = spec.get("template", {}).get("spec", {}), "spec.template.spec"
    else:
        prefix = "spec"
    return [
        (f"{prefix}.replicatedJobs[{i}]({rjob.get('name')})", rjob.get("template", {}))
        for i, rjob in enumerate(spec.get("replicatedJobs", []))
    ]


def as_job(doc: dict, rjob_path: str, template: dict) -> dict:
    name = f"{doc['metadata']['name']}-{rjob_path.rpartition('(')[2].rstrip(')')}"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**template.get("metadata", {}), "name": name},
        "spec": template.get("spec", {}),
    }


def check_core(doc: dict, versions: list[str]) -> list[str]:
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            problems.append(f"Kubernetes {version}: {where}: {err.message}")
        except kubernetes_validate.utils.SchemaNotFoundError:
            kind = f"{doc.get('apiVersion')} {doc.get('kind')}"
            return [f"{kind}: not a Kubernetes kind, and no CRD for it in --crds"]
    return problems


def check_custom(doc: dict, schema: dict, versions: list[str]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"schema: {'.'.join(str(p) for p in err.absolute_path)}: {err.message}"
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    problems += [f"metadata: {p}" for p in check_core(meta, versions)]
    for path, template in job_templates(doc):
        job = as_job(doc, path, template)
        problems += [f"{path}.template as a Job: {p}" for p in check_core(job, versions)]
    return problems


def validate(paths: list[Path], crds: Path, versions: list[str], emit: Path | None) -> list[str]:
    schemas = crd_schemas(crds)
    problems = []
    for path in paths:
        for doc in load(path):
            api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            label = f"{path}: {kind} {doc.get('metadata', {}).get('name')}"
            if (api, kind) in schemas:
                found = check_custom(doc, schemas[(api, kind)], versions)
                if emit:
                    for rjob_path, template in job_templates(doc):
                        job = as_job(doc, rjob_path, template)
                        out = emit / f"{path.stem}-{job['metadata']['name']}.yaml"
                        out.write_text(yaml.safe_dump(job, sort_keys=False))
            else:
                found = check_core(doc, versions)
            problems += [f"{label}: {p}" for p in found]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--crds", type=Path, required=True, help="directory of CRD YAML files")
    parser.add_argument(
        "--versions", nargs="+", default=["1.31.0", "latest"], help="Kubernetes versions"
    )
    parser.add_argument("--emit-jobs", type=Path, help="write the Job templates of CRs here")
    args = parser.parse_args(argv)
    if not args.crds.is_dir():
        parser.error(f"--crds {args.crds}: not a directory (CRDs of JobSet and Kubeflow Trainer)")
    latest = kubernetes_validate.latest_version()
    versions = [latest if v == "latest" else v for v in args.versions]
    if args.emit_jobs:
        args.emit_jobs.mkdir(parents=True, exist_ok=True)
    problems = validate(args.manifests, args.crds, versions, args.emit_jobs)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    count = sum(len(load(p)) for p in args.manifests)
    print(
        f"k8s: {count} objects in {len(args.manifests)} files valid for Kubernetes "
        f"{', '.join(versions)} and the CRDs in {args.crds}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
