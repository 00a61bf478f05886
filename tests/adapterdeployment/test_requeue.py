"""What a tick asks of the work queue (`Outcome.again`), and what happens when the API server
refuses an object rendered from the spec (issue 15, bug 4): the AdapterDeployment says so."""

from __future__ import annotations

import json

from ragtune.adapterdeployment import rollout
from ragtune.adapterdeployment.rollout import Reconciler
from ragtune.runtime.kube import KubeError

from .fakekube import FakeKube
from .test_rollout import IMAGE, ad, ftj, status


def tick(kube: FakeKube) -> rollout.Outcome:
    return Reconciler(kube, IMAGE, clock=lambda: kube.clock).tick("ns", "chat")


class RefusingKube(FakeKube):
    """Refuses to create objects of one kind the way the API server does (422 Invalid)."""

    def __init__(self, kind: str, message: str):
        super().__init__()
        self.kind, self.message, self.refused = kind, message, 0

    def create(self, obj):
        if obj["kind"] == self.kind:
            self.refused += 1
            raise KubeError.from_response(422, "POST", f"/apis/.../{self.kind.lower()}s", json.dumps(
                {"kind": "Status", "reason": "Invalid", "message": self.message}))
        return super().create(obj)


def test_a_refused_child_ends_the_rollout_failed_with_the_api_servers_message():
    message = ('Deployment.apps "chat-tgi" is invalid: spec.template.spec.containers[0].image: '
               'Required value')
    kube = RefusingKube("Deployment", message)
    ftj(kube, "ftj1")
    ad(kube, strategy={"type": "Direct"})
    out = tick(kube)
    s = status(kube)
    assert s.phase == "Failed" and "spec.template.spec.containers[0].image: Required value" in s.message
    progressing = next(c for c in s.conditions if c.type == "Progressing")
    assert (progressing.status, progressing.reason) == ("False", "RejectedByAPIServer")
    assert [e[:2] for e in kube.events if e[0] == "Warning"] == [("Warning", "RejectedByAPIServer")]
    assert s.observed_generation == 1 and s.candidate is None and out.again is None
    # permanent until the spec changes: the next tick neither retries nor writes
    writes, events = len(kube.writes), len(kube.events)
    assert tick(kube).again is None and kube.refused == 1
    assert (len(kube.writes), len(kube.events)) == (writes, events)


def test_a_transient_api_error_is_left_to_the_queue_backoff():
    kube = RefusingKube("Deployment", "etcdserver: request timed out")
    kube.create = lambda obj: (_ for _ in ()).throw(KubeError(503, "ServiceUnavailable", "try later"))
    ftj(kube, "ftj1")
    ad(kube, strategy={"type": "Direct"})
    try:
        tick(kube)
    except KubeError as err:
        assert err.retryable
    else:
        raise AssertionError("a 503 must reach the work queue (retried with backoff)")


def test_only_what_waits_is_requeued():
    kube = FakeKube()
    ftj(kube, "ftj1", phase="Running")
    ad(kube, strategy={"type": "Direct"})
    assert tick(kube).again == rollout.FINETUNEJOB_WAIT_SECONDS  # its watch events come first
    ftj(kube, "ftj1")
    assert tick(kube).again == rollout.ROLLOUT_POLL_SECONDS  # rolling the stable server
    kube.ready("chat-tgi")
    assert status(kube).candidate is not None
    assert tick(kube).again is None and status(kube).phase == "Ready"  # idle: watch events only
    assert tick(kube).again is None
    kube.objects[("Deployment", "ns", "chat-tgi")]["status"]["readyReplicas"] = 0
    assert tick(kube).again is None and status(kube).phase == "Degraded"  # its pods' events bring it back
    pod = kube.add_pod("chat-tgi")
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]  # seen before the Deployment counts it
    assert tick(kube).again is None and status(kube).phase == "Ready"


def test_a_referenced_server_is_not_watched_so_its_health_is_reread():
    kube = FakeKube()
    ftj(kube, "ftj1")
    kube.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "user-tgi", "namespace": "ns"},
                 "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "u"}},
                          "template": {"metadata": {"labels": {"app": "u"}},
                                       "spec": {"containers": [{"name": "tgi", "image": "tgi:1"}]}}}})
    ad(kube, strategy={"type": "Direct"}, server={"gpus": 0, "deploymentRef": {"name": "user-tgi"}})
    tick(kube)
    kube.ready("user-tgi")
    assert tick(kube).again == rollout.REFERENCED_HEALTH_SECONDS and status(kube).phase == "Ready"


def test_a_uri_adapter_with_no_offline_gate_needs_no_evaluation_job():
    kube = FakeKube()
    ad(kube, adapters=[{"name": "a", "uri": "s3://models/runs/r1/", "sha256": "b" * 64}],
       strategy={"type": "Direct"}, gates={"requireOfflinePass": False})  # refusalConstruction keeps its default
    tick(kube)
    assert status(kube).candidate.step == "Promoting" and kube.kinds("Job") == []
