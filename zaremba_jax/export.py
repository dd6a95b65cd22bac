"""`--mode=export`: a checkpoint's parameters as a PyTorch state_dict (safetensors) or a numpy .npz.

The state_dict is that of this PyTorch model (docs/corpora.md shows it whole):

    embedding = nn.Embedding(V, H)                              embedding.weight      [V, H]
    lstm = nn.LSTM(H, H, num_layers=L, batch_first=True)        lstm.weight_ih_l{k}   [4H, H]
                                                                lstm.weight_hh_l{k}   [4H, H]
                                                                lstm.bias_ih_l{k}     [4H]
                                                                lstm.bias_hh_l{k}     [4H]
    (with --projection_reg: projection = nn.Linear(H, H))       projection.weight/bias
    decoder = nn.Linear(H, V)                                   decoder.weight [V, H], .bias [V]

Two conversions make it PyTorch's: PyTorch orders the four gate blocks i, f, g, o where this
model orders them i, f, o, g (model.py); and PyTorch adds two biases, b_ih + b_hh, where this
model has one, so b_ih holds it and b_hh is zeros. Weights are transposed (PyTorch keeps
[out, in]). A tied model's decoder.weight is a copy of embedding.weight. A checkpoint of K > 1
members holds each member's arrays under "members.{k}.".

The safetensors file (8-byte little-endian header length, a JSON header, the raw little-endian
arrays) is written with numpy alone: the package gains no dependency. Its header's metadata holds
the vocabulary (JSON, list index = token id) and the model's config. The .npz holds the same
arrays, plus `vocab` (strings) and `config` (JSON), readable with allow_pickle=False.
"""

import json
import os
import struct
import tempfile

import numpy as np

FORMAT = "zaremba_jax.torch_lstm.v1"
# Our gate blocks are i, f, o, g; PyTorch's are i, f, g, o: its block j is our block TO_TORCH[j].
TO_TORCH = (0, 1, 3, 2)
DTYPES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int32"): "I32",
          np.dtype("int64"): "I64"}


class ExportError(ValueError):
  """The export could not be written. The message says what to do."""


def _gates_to_torch(a_Xx4H: np.ndarray) -> np.ndarray:
  """Columns in blocks [i, f, o, g] -> rows in blocks [i, f, g, o] (transposed: PyTorch's [4H, X])."""
  blocks = np.split(np.asarray(a_Xx4H, np.float32), 4, axis=-1)
  return np.concatenate([blocks[j] for j in TO_TORCH], axis=-1).T


def torch_state_dict(params) -> dict[str, np.ndarray]:
  """One model's parameters (no member axis) as PyTorch's state_dict arrays, float32."""
  out = {"embedding.weight": np.asarray(params["embedding"], np.float32)}
  layer = 0
  while f"lstm_{layer}" in params:
    p = params[f"lstm_{layer}"]
    out[f"lstm.weight_ih_l{layer}"] = _gates_to_torch(p["w_ih"])
    out[f"lstm.weight_hh_l{layer}"] = _gates_to_torch(p["w_hh"])
    out[f"lstm.bias_ih_l{layer}"] = _gates_to_torch(np.asarray(p["b"])[None, :])[:, 0]
    out[f"lstm.bias_hh_l{layer}"] = np.zeros_like(out[f"lstm.bias_ih_l{layer}"])
    layer += 1
  if "projection_w" in params:
    out["projection.weight"] = np.asarray(params["projection_w"], np.float32).T
    out["projection.bias"] = np.asarray(params["projection_b"], np.float32)
  softmax_w = params["softmax_w"] if "softmax_w" in params else params["embedding"].T
  out["decoder.weight"] = np.ascontiguousarray(np.asarray(softmax_w, np.float32).T)
  out["decoder.bias"] = np.asarray(params["softmax_b"], np.float32)
  return {name: np.ascontiguousarray(a) for name, a in out.items()}


def member_state_dicts(params_K) -> dict[str, np.ndarray]:
  """Every member's state_dict: plain names for one member, "members.{k}." before each for K."""
  import jax  # pylint: disable=import-outside-toplevel
  count = jax.tree.leaves(params_K)[0].shape[0]
  host = jax.tree.map(np.asarray, params_K)
  if count == 1:
    return torch_state_dict(jax.tree.map(lambda x: x[0], host))
  out = {}
  for k in range(count):
    for name, array in torch_state_dict(jax.tree.map(lambda x, k=k: x[k], host)).items():
      out[f"members.{k}.{name}"] = array
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """Writes `tensors` (name -> array) and string `metadata` as a safetensors file, atomically."""
  header, offset = {}, 0
  for name, array in tensors.items():
    if array.dtype not in DTYPES:
      raise ExportError(f"{name}: dtype {array.dtype} has no safetensors name here")
    size = array.nbytes
    header[name] = {"dtype": DTYPES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  header["__metadata__"] = metadata
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)  # the arrays start 8-byte aligned
  def write(f):
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
              .tobytes())
  _atomic(path, write)


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a safetensors file, with numpy alone."""
  names = {v: k for k, v in DTYPES.items()}
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    data = f.read()
  metadata = header.pop("__metadata__", {})
  tensors = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    dtype = names[info["dtype"]].newbyteorder("<")
    tensors[name] = np.frombuffer(data[begin:end], dtype).reshape(info["shape"])
  return tensors, metadata


def _atomic(path: str, write) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ExportError(f"--output={path}: folder {folder} does not exist; create it first")
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def export(trained, path: str) -> dict:
  """Writes `trained`'s parameters to `path`: .safetensors (PyTorch) or .npz (numpy).

  Returns:
    {'path', 'tensors': how many arrays, 'members', 'vocab_size'}.

  Raises:
    ExportError: the path's extension is neither, or its folder does not exist.
  """
  import jax  # pylint: disable=import-outside-toplevel
  tensors = member_state_dicts(trained.params)
  config = trained.config.to_dict()
  members = jax.tree.leaves(trained.params)[0].shape[0]
  info = {"format": FORMAT, "vocab": json.dumps(list(trained.vocab)), "config": json.dumps(config),
          "step": str(trained.step), "members": str(members),
          "gate_order": "i,f,g,o (PyTorch's; converted from this model's i,f,o,g)"}
  if path.endswith(".safetensors"):
    write_safetensors(path, tensors, info)
  elif path.endswith(".npz"):
    arrays = {**tensors, "vocab": np.array(list(trained.vocab), dtype=str),
              "config": np.array(info["config"]), "format": np.array(FORMAT)}
    _atomic(path, lambda f: np.savez(f, **arrays))
  else:
    raise ExportError(f"--output={path} must end in .safetensors (PyTorch) or .npz (numpy)")
  return {"path": path, "tensors": len(tensors), "members": members,
          "vocab_size": len(trained.vocab)}
