"""Names shared by the repository generator, the python models and the client (no heavy imports:
every python model process loads this)."""

ENSEMBLE, PREPROCESS, LLM = "crema", "preprocess", "llm"
LLM_STAGES = ("fuse_encode", "decoder_first", "decoder_step")  # run by the llm model (in it, or through BLS)
MODEL_INFO = "crema.json"  # next to each python model: the stage and the CREMA config it serves

# (name, dtype, dims, optional) of the ensemble's task options and outputs
TASK_INPUTS = [("task", "bytes", [1], True), ("num_beams", "int32", [1], True), ("max_new_tokens", "int32", [1], True)]
ANSWER_OUTPUTS = [("answer", "bytes", [1], False), ("option_scores", "float32", [-1], False)]
