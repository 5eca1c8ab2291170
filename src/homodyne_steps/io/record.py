"""Typed records: the JSON files one stage writes and another reads, as dataclasses.

A record class is a frozen dataclass whose fields are the file's keys, in the order the
file has them. ``to_json()`` gives the mapping the writer writes (the JSON contract), and
``from_json(mapping, source)`` checks a mapping read from a file against the field types,
so a reader works with attributes and a wrong or truncated file is one error naming the
file, the key and what was expected. ``read(path)`` is ``from_json`` of a file.

Field types that are understood: ``bool``, ``int``, ``float`` (an int is accepted and
kept as written, so a file read and written back is unchanged), ``str``, ``Any``,
``X | None``, ``list[X]``, ``dict[str, X]`` and other record classes. A field whose
default is :data:`ABSENT` may be missing from the file (older writers); ``to_json``
then leaves the key out. Keys a reader does not know are ignored, so a file written by a
newer version still reads. A key that is no Python name (``hdi_3%``) is given with
``field(metadata={"key": "hdi_3%"})`` on a field of another name (:func:`json_key`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from homodyne_steps.io.serialise import (
    SerialisationError,
    read_json_object,
    to_jsonable,
    write_json,
)


class RecordError(SerialisationError):
    """A JSON record lacks a key or holds a value of the wrong kind."""


class _Absent:
    """The default of a field that older files may lack; never written."""

    _instance: ClassVar[_Absent | None] = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


def or_none(value: Any) -> Any:
    """``value``, or None where it is :data:`ABSENT` (a key the file does not hold)."""
    return None if value is ABSENT else value


R = TypeVar("R", bound="Record")

_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(tp: Any) -> str:
    if tp in _KIND:
        return _KIND[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return "a list"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, Record)):
        return "an object"
    return str(tp)


def _found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} of length {len(value)}"


def _parse(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against ``tp`` (records built, everything else kept as is)."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _parse(value, arg, where)
                except RecordError:
                    continue
        raise RecordError(f"key {where!r}: expected {_describe(tp)}, found {_found(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"key {where!r}: expected a list, found {_found(value)}")
        return [_parse(v, args[0], f"{where}[{k}]") for k, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecordError(f"key {where!r}: expected an object, found {_found(value)}")
        return {str(k): _parse(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp._from_mapping(value, where)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"record field type {tp!r} at {where} is not supported")
    if not ok(value):
        raise RecordError(f"key {where!r}: expected {_describe(tp)}, found {_found(value)}")
    return value


def json_key(f: dataclasses.Field[Any]) -> str:
    """The file's key of a record field: its ``metadata["key"]``, else its name."""
    return f.metadata.get("key", f.name)


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _dump(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Record:
    """Base of the typed records; subclasses are frozen dataclasses (see the module)."""

    #: what the file is, for error messages ("NLSQ parameters.json")
    WHAT: ClassVar[str] = "record"

    def to_json(self) -> dict[str, Any]:
        """The mapping written to the file: every field in order, ABSENT ones left out."""
        return {
            json_key(f): _dump(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not ABSENT
        }

    @classmethod
    def _from_mapping(cls: type[R], value: Any, where: str) -> R:
        if not isinstance(value, Mapping):
            what = f"key {where!r}" if where else cls.WHAT
            raise RecordError(f"{what}: expected an object, found {_found(value)}")
        hints = get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            name = json_key(f)
            key = f"{where}.{name}" if where else name
            if name not in value:
                if f.default is ABSENT:
                    continue
                raise RecordError(f"key {key!r} is missing (expected {_describe(hints[f.name])})")
            kwargs[f.name] = _parse(value[name], hints[f.name], key)
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[R], value: Any, source: str | os.PathLike[str] | None = None) -> R:
        """The record of a mapping read from JSON; errors name ``source`` and the key."""
        try:
            return cls._from_mapping(value, "")
        except RecordError as exc:
            where = f"{os.fspath(source)}: " if source is not None else ""
            raise RecordError(f"{where}{cls.WHAT}: {exc}") from None

    @classmethod
    def of_mapping(
        cls: type[R],
        mapping: Mapping[str, Any],
        source: str | os.PathLike[str] | None = None,
        *,
        null_non_finite: bool = False,
    ) -> R:
        """The record a writer built as a mapping, as it will be written (numpy values
        to JSON types; non-finite numbers to null with ``null_non_finite``). RecordError
        when a value is of the wrong kind or the record would not write the mapping back
        unchanged (a key the record does not declare would be lost)."""
        clean = to_jsonable(mapping, null_non_finite=null_non_finite)
        rec = cls.from_json(clean, source)
        if json.dumps(rec.to_json()) != json.dumps(clean):  # key order is the contract
            where = f"{os.fspath(source)}: " if source is not None else ""
            raise RecordError(f"{where}{cls.WHAT}: {cls.__name__} does not hold every key")
        return rec

    @classmethod
    def read(cls: type[R], path: str | os.PathLike[str]) -> R:
        """The record in the JSON file ``path``."""
        return cls.from_json(read_json_object(path), path)

    def write(self, path: str | os.PathLike[str]) -> os.PathLike[str]:
        """Write the record atomically as strict JSON."""
        return write_json(path, self.to_json())


__all__ = ["ABSENT", "Record", "RecordError", "json_key", "or_none"]
