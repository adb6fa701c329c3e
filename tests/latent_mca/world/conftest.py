import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from latent_mca.world import WorldSpec, generate_world

SMALL = dict(num_paired=60, num_text_only=120, num_dialogue_train=30, num_test_id=10, num_test_ood=10,
             samples_per_shard=16, num_characters=6)


def small_spec(**overrides):
    return WorldSpec(**{**SMALL, **overrides})


def read_shards(folder, prefix=None):
    """{tar name: {key: {ext: bytes}}} read with the standard library (independent of the writer)."""
    out = {}
    for path in sorted(Path(folder).glob("*.tar")):
        if prefix is not None and not path.name.startswith(prefix + "-"):
            continue
        samples = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        out[path.name] = samples
    return out


def samples_of(folder, prefix=None):
    """All samples of a directory as (key, json dict, png bytes or None)."""
    return [(key, json.loads(fields["json"]), fields.get("png"))
            for shard in read_shards(folder, prefix).values() for key, fields in shard.items()]


def decode(png):
    return Image.open(io.BytesIO(png)).convert("RGB")


def texts_of(record):
    """Every text of a sample: message strings, structured text items and the reference."""
    texts = []
    for message in record["messages"]:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [item["text"] for item in content if item["type"] == "text"]
    if "reference" in record:
        texts.append(record["reference"])
    return texts


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = generate_world(out, small_spec(), seed=3)
    return out, summary, json.loads((out / "world.json").read_text())
