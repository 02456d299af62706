"""A metadata probe that crashes its process on one slide (as a segfault in a native reader would);
used by test_archive_slides.py to check that only that slide is marked."""
import os


def probe(job):
    if "crash" in job[1]:
        os._exit(139)
    return {"slide_id": job[0], "path": job[1], "status": "ok", "error": ""}
