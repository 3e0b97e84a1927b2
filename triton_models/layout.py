"""Names shared by the repository generator, the python models and the client (no heavy imports:
every python model process loads this)."""

ENSEMBLE, PREPROCESS, LLM = "crema", "preprocess", "llm"
LLM_STAGES = ("fuse_encode", "decoder_first", "decoder_step")  # run by the llm model (in it, or through BLS)
QUEUE_TIMEOUT_MS, MAX_QUEUE = 60_000, 64  # defaults of every model's queue policy (repository.queue_policy)
MODEL_INFO = "crema.json"  # next to each python model: the stage and the CREMA config it serves

# (name, dtype, dims, optional) of the ensemble's task options and outputs. Generation options override the
# model's settings; prompt fields (a dataset's structured request: runtime/datasets.py structured_prompt)
# make the llm model build the dataset's prompt around the question (models exported with --dataset)
GENERATION_INPUTS = [("task", "bytes", [1], True), ("num_beams", "int32", [1], True),
                     ("max_new_tokens", "int32", [1], True)]
PROMPT_INPUTS = [("options", "bytes", [-1], True), ("situation", "bytes", [1], True),
                 ("templ_values", "bytes", [1], True)]
TASK_INPUTS = GENERATION_INPUTS + PROMPT_INPUTS
# question_tokens: [read, given]; given > read when the question was cut to max_txt_len (as CREMA cuts it)
ANSWER_OUTPUTS = [("answer", "bytes", [1], False), ("option_scores", "float32", [-1], False),
                  ("question_tokens", "int32", [2], False)]
ANSWER_NAMES = [x[0] for x in ANSWER_OUTPUTS]

# request parameter the front sets on every inference it forwards (a client's own is replaced): the
# request's deadline as unix time in ms. Triton passes request parameters through the ensemble to its
# steps; the llm model's decode loop stops when it passes.
DEADLINE_PARAMETER = "crema_deadline_ms"
ID_PARAMETER = "crema_request_id"  # and its id on the cancellation board (triton_models/cancel.py)
