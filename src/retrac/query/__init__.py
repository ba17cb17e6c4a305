"""Query side: train and query vectors (TracIn / ReTrac / D-TRAK), the FAISS inner-product index, attribution.

``retrac.query.index`` builds, searches, saves and loads the inner-product index over the train
vectors ``U(z)``; a score it returns is the inner product ``<U(z), Q(z')>`` (positive = proponent).
"""
