"""Time one attention node, ONNX Runtime's GroupQueryAttention against the kernel library's
SlotAttention, on SmolLM2's shape (9 query heads, 3 KV heads of 64), rows 1 / 2 / 8 / 32 at
contexts 150 and 1000: microseconds per call (minimum of 200), through IOBinding, KV in place.

    python tools/experiments/packing/attention_node.py
"""
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from conflayers.runtime import kernels

N, NKV, H = 9, 3, 64
def model(op, S, CAP):
    ins = ["qkv", "", "", "pk", "pv", "sk"] + (["tot"] if op == "GroupQueryAttention" else []) + ["cos", "sin"]
    dom = "com.microsoft" if op == "GroupQueryAttention" else "conflayers"
    n = helper.make_node(op, ins, ["o", "pk_o", "pv_o"], domain=dom, num_heads=N, kv_num_heads=NKV, do_rotary=1, scale=0.125, local_window_size=-1)
    vi = lambda nm, t, s: helper.make_tensor_value_info(nm, t, s)
    inputs = [vi("qkv", TensorProto.FLOAT, [1, "S", (N + 2 * NKV) * H]), vi("pk", TensorProto.FLOAT, [1, NKV, "L", H]), vi("pv", TensorProto.FLOAT, [1, NKV, "L", H]), vi("sk", TensorProto.INT32, [1])]
    if op == "GroupQueryAttention": inputs.append(vi("tot", TensorProto.INT32, []))
    inputs += [vi("cos", TensorProto.FLOAT, ["P", H // 2]), vi("sin", TensorProto.FLOAT, ["P", H // 2])]
    g = helper.make_graph([n], "g", inputs, [vi("o", TensorProto.FLOAT, [1, "S", N * H]), vi("pk_o", TensorProto.FLOAT, [1, NKV, "L", H]), vi("pv_o", TensorProto.FLOAT, [1, NKV, "L", H])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("conflayers", 1)])
    so = ort.SessionOptions(); so.register_custom_ops_library(kernels.library()); so.intra_op_num_threads = 2; so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
for ctx in (150, 1000):
    for S in (1, 2, 8, 32):
        line = []
        for op in ("GroupQueryAttention", "SlotAttention"):
            cap = ctx + 64
            s = model(op, S, cap)
            pk = np.random.rand(1, NKV, cap, H).astype(np.float32); pv = pk.copy()
            b = s.io_binding(); opk = ort.OrtValue.ortvalue_from_numpy(pk); opv = ort.OrtValue.ortvalue_from_numpy(pv)
            b.bind_ortvalue_input("pk", opk); b.bind_ortvalue_output("pk_o", opk); b.bind_ortvalue_input("pv", opv); b.bind_ortvalue_output("pv_o", opv)
            b.bind_cpu_input("qkv", np.random.rand(1, S, (N + 2 * NKV) * H).astype(np.float32)); b.bind_cpu_input("sk", np.array([ctx + S - 1], np.int32))
            if op == "GroupQueryAttention": b.bind_cpu_input("tot", np.array(ctx + S, np.int32))
            b.bind_cpu_input("cos", np.random.rand(cap + 8, H // 2).astype(np.float32)); b.bind_cpu_input("sin", np.random.rand(cap + 8, H // 2).astype(np.float32)); b.bind_output("o")
            for _ in range(20): s.run_with_iobinding(b)
            ts = []
            for _ in range(200):
                t = time.perf_counter(); s.run_with_iobinding(b); ts.append(time.perf_counter() - t)
            line.append(f"{op[:4]} {min(ts) * 1e6:6.0f} us")
        print(f"ctx {ctx} S {S}: " + "  ".join(line))
