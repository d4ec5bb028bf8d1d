"""Knowledge-base management over HTTP: upload, jobs, files, search, delete, rebuild."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from api.errors import APIError
from knowledge.names import NameError_, check_kb_name, safe_file_name
from knowledge.service import KnowledgeService, Upload

router = APIRouter(prefix="/api/knowledge", tags=["knowledge"])


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    query: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(3, ge=1, le=50)


def _service(request: Request) -> KnowledgeService:
    service = request.app.state.knowledge
    if service is None:
        raise APIError(400, "this server has no knowledge base", param="kb")
    return service


@router.get("", summary="List knowledge bases")
async def list_bases(request: Request) -> dict:
    # the shared catalog (a folder or Milvus) is read: off the event loop
    return {"knowledge_bases": await asyncio.to_thread(_service(request).summaries)}


def _no_job(job_id: str) -> APIError:
    return APIError(404, f"no ingestion job {job_id[:64]!r} (jobs are kept in memory until restart)",
                    type_="not_found_error", param="job_id")


@router.get("/jobs/{job_id}", summary="State of an ingestion job")
async def get_job(job_id: str, request: Request) -> dict:
    job = _service(request).jobs.get(job_id)
    if job is None:
        raise _no_job(job_id)
    return job.as_dict()


@router.delete("/jobs/{job_id}", summary="Cancel an ingestion job (nothing of it is saved)")
async def cancel_job(job_id: str, request: Request) -> dict:
    job = _service(request).cancel_job(job_id)
    if job is None:
        raise _no_job(job_id)
    return job.as_dict()


@router.post(
    "/{kb}/files",
    summary="Upload files (multipart field `files`) to be parsed and vectorised",
    status_code=202,
    responses={200: {"description": "with ?wait=true: the finished job"}, 413: {"description": "too many or too large files"},
               503: {"description": "too many upload jobs queued (Retry-After)"}},
    # the multipart body is read by hand, after the guard's size check; this describes it
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    }}}}},
)
async def upload_files(kb: str, request: Request, wait: bool = Query(False, description="answer when the job is finished")) -> JSONResponse:
    service = _service(request)
    check_kb_name(kb)  # before any upload is read (the guard has checked the token and the total size)
    limits = service.config
    max_bytes = int(limits.max_upload_mb * 1024 * 1024)
    form = await request.form(max_files=limits.max_upload_files + 1, max_fields=50)
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise APIError(400, "no files: send them as multipart form field 'files'", param="files")
        if len(files) > limits.max_upload_files:
            raise APIError(413, f"{len(files)} files in one upload; the limit is {limits.max_upload_files}", param="files", code="too_many_files")
        uploads = []
        for f in files:
            data = await f.read(max_bytes + 1)
            try:
                name = safe_file_name(f.filename or "")
            except NameError_ as exc:
                raise APIError(400, str(exc), param="files") from None
            if len(data) > max_bytes:
                raise APIError(413, f"file {name!r} is larger than the limit of {limits.max_upload_mb:g} MB", param="files", code="file_too_large")
            uploads.append(Upload(name, data))
    finally:
        await form.close()
    job, future = service.submit(kb, uploads)
    if wait:
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancelled():
                raise  # this request was cancelled, not the job
        return JSONResponse(job.as_dict(), status_code=200)
    return JSONResponse(job.as_dict(), status_code=202, headers={"Location": f"/api/knowledge/jobs/{job.id}"})


@router.get("/{kb}/files", summary="Files in a knowledge base, with chunk counts")
async def list_files(kb: str, request: Request) -> dict:
    base = await asyncio.to_thread(_service(request).get, kb)
    return {"kb": base.name, "files": base.files(), "chunks": base.chunk_count}


@router.delete("/{kb}/files/{name}", summary="Remove a file and its vectors")
async def delete_file(kb: str, name: str, request: Request) -> dict:
    base = await asyncio.to_thread(_service(request).get, kb)
    try:
        removed = await asyncio.to_thread(base.delete_file, name)
    except KeyError:
        raise APIError(404, f"knowledge base {kb!r} has no file {name!r}", type_="not_found_error", param="name") from None
    return {"kb": base.name, "deleted": name, "chunks_removed": removed}


@router.delete("/{kb}", summary="Delete a whole knowledge base")
async def delete_base(kb: str, request: Request) -> dict:
    await asyncio.to_thread(_service(request).delete_base, kb)
    return {"deleted": kb}


@router.post("/{kb}/search", summary="Retrieve the chunks closest to a query")
async def search(kb: str, body: SearchRequest, request: Request) -> dict:
    service = _service(request)
    hits = await service.search(kb, body.query, body.top_k)
    return {"kb": kb, "query": body.query, "hits": [h.as_source() | {"relevant": service.is_relevant(h)} for h in hits]}


@router.post("/{kb}/rebuild", summary="Re-embed a base with the running embedding model")
async def rebuild(kb: str, request: Request) -> dict:
    base = await asyncio.to_thread(_service(request).get, kb)
    chunks = await asyncio.to_thread(base.rebuild)
    return base.summary() | {"rebuilt_chunks": chunks}
