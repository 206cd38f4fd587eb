"""Offline research harness, apart from the sidecar: offline training and the published evaluation
protocols (`livetower eval`), the incremental-vs-offline study, and the plain SASRec reference.
The sidecar (trainer/ outside this folder) never imports it."""
