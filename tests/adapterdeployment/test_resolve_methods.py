"""An AdapterDeployment refuses, at resolution, a FineTuneJob adapter of a method no serving
backend loads (dora, ia3), naming the method and what to do; lora and qlora resolve."""

from __future__ import annotations

import pytest

from ragtune.adapterdeployment.resolve import ResolveError, resolve
from ragtune.api.adapterdeployment import AdapterDeploymentSpec

from .test_resolve import BASE, job


def deployment(backend: str) -> AdapterDeploymentSpec:
    return AdapterDeploymentSpec.model_validate({"baseModel": BASE, "server": {"backend": backend},
                                                 "adapters": [{"name": "a", "fineTuneJobRef": {"name": "j"}}]})


def trained_with(method=None) -> dict:
    ftj = job()
    if method:
        ftj["spec"]["method"] = method
    return ftj


@pytest.mark.parametrize("backend", ["tgi", "vllm"])
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_unservable_methods_are_refused_naming_the_method_and_the_remedy(backend, method):
    with pytest.raises(ResolveError) as err:
        resolve(deployment(backend), {"j": trained_with(method)}.get)
    assert err.value.reason == "AdapterMethodNotServable"
    text = str(err.value)
    assert f"adapter a (FineTuneJob j) was trained with method {method}, which {backend} cannot load" in text
    assert "retrain with method lora or qlora" in text and "merge the adapter into the base model" in text


@pytest.mark.parametrize("backend", ["tgi", "vllm"])
@pytest.mark.parametrize("method", ["lora", "qlora", None])  # None: the FineTuneJob default (qlora)
def test_lora_adapters_resolve(backend, method):
    assert resolve(deployment(backend), {"j": trained_with(method)}.get).adapters[0].name == "a"


@pytest.mark.parametrize("backend", ["tgi", "vllm"])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_adapters_with_trained_biases_are_refused_naming_the_field_and_the_remedy(backend, bias):
    ftj = trained_with("lora")
    ftj["spec"]["lora"] = {"bias": bias}
    with pytest.raises(ResolveError) as err:
        resolve(deployment(backend), {"j": ftj}.get)
    assert err.value.reason == "AdapterBiasNotServable"
    assert f"trained with lora.bias {bias}" in str(err.value) and "retrain with lora.bias none" in str(err.value)
    ftj["spec"]["lora"] = {"bias": "none"}
    assert resolve(deployment(backend), {"j": ftj}.get).adapters[0].name == "a"


def test_the_controller_fails_the_rollout_before_anything_rolls():
    from .fakekube import FakeKube
    from .test_rollout import ad, ftj, tick

    kube = FakeKube()
    ftj(kube, "ftj1")
    kube.objects[("FineTuneJob", "ns", "ftj1")]["spec"]["method"] = "dora"
    ad(kube)
    s = tick(kube)
    assert s.phase == "Failed" and s.history[0].reason.startswith("AdapterMethodNotServable")
    assert "trained with method dora" in s.message and kube.kinds("Deployment") == []


@pytest.mark.parametrize("config, named", [({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
                                           ({"use_dora": True}, "DoRA adapters are not supported by TGI or vLLM"),
                                           ({"bias": "all"}, "trained biases (bias 'all') are not loaded")])
def test_a_uri_adapter_of_another_method_is_refused_by_the_fetcher_with_the_remedy(config, named):
    from ragtune.pods.fetch import FetchError, check_adapter_config

    with pytest.raises(FetchError) as err:
        check_adapter_config("x", {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], **config}, {"q_proj"}, 128)
    assert named in str(err.value) and "merge the adapter into the base model" in str(err.value)
