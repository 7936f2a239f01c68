"""The optional encrypted history: the key (key.py), the SQLCipher file (database.py), the
store service that writes on its own thread (store.py), and the recorder that hears jobs
(recorder.py)."""
