"""The run's own work files (stores.write_work / read_work): what goes in comes back."""

import torch

from llm_surgeon.stores import DiskStates, WorkFiles, read_work, write_work


def test_work_file_round_trips_nested_values_of_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    obj = {
        "q": (A, torch.randn(3, 3, generator=g), None, True),
        "k": (A, torch.randn(2, 7, generator=g).to(torch.bfloat16)[:, 1:5], 0.5, "x"),
        "mask": torch.rand(4, 9, generator=g) > 0.5,
        "ids": [torch.arange(7, dtype=torch.int64), torch.tensor(3.0), torch.empty(0, 4)],
    }
    write_work(obj, tmp_path / "w.bin")
    back = read_work(tmp_path / "w.bin")
    assert back.keys() == obj.keys()
    assert isinstance(back["q"], tuple) and isinstance(back["ids"], list)
    assert back["q"][2:] == (None, True) and back["k"][2:] == (0.5, "x")
    for got, want in [(back["q"][0], A), (back["q"][1], obj["q"][1]), (back["k"][1], obj["k"][1]),
                      (back["mask"], obj["mask"]), *zip(back["ids"], obj["ids"], strict=True)]:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    # a tensor held twice is stored once and comes back as one tensor, as torch.load would
    assert back["q"][0] is back["k"][0]
    assert (tmp_path / "w.bin").stat().st_size < 8 + 4096 + 2 * A.numel() * 8


def test_work_file_tensors_are_aligned_and_independent(tmp_path):
    a, b = torch.ones(3, dtype=torch.int8), torch.zeros(10, dtype=torch.float64)
    write_work((a, b), tmp_path / "w.bin")
    ra, rb = read_work(tmp_path / "w.bin")
    rb += 1  # writing one tensor leaves its neighbour in the file's buffer alone
    assert torch.equal(ra, a) and torch.equal(rb, torch.ones(10, dtype=torch.float64))
    assert rb.data_ptr() % 64 == 0


def test_stores_keep_tensors_by_key(tmp_path):
    states = DiskStates(tmp_path / "s")
    h = torch.randn(2, 3, 4)
    states.save("h", 3, 1, h.requires_grad_(True))
    assert torch.equal(states.load("h", 3, 1), h.detach())
    states.drop("h", 3, 1)
    assert not list((tmp_path / "s").iterdir())
    work = WorkFiles(tmp_path / "w")
    work.put("curv0", {"a": (h.detach(), None)})
    assert torch.equal(work.get("curv0")["a"][0], h.detach())
    work.clear()
    assert not list((tmp_path / "w").iterdir())
