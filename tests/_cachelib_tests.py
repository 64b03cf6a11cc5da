# cachelib's own backend test mixins, vendored so CI needs nothing but cachelib:
# copied unchanged from cachelib 0.17.0's source distribution, tests/conftest.py
# (class TestData), tests/common.py (CommonTests), tests/clear.py (ClearTests),
# tests/has.py (HasTests), tests/serializer.py (SerializerTests),
# tests/delete_many_with_prefix.py (DeleteManyWithPrefixTests) and the
# SillySerializer of tests/test_simple_cache.py, with only the imports they use.
# One change: CommonTests.test_expiration's skip under uwsgi (whose sweeper thread
# expires entries) is left out, since these run only against MmapCache.
# Refresh them by copying those classes from the sdist of a newer cachelib:
#   pip download --no-deps --no-binary :all: cachelib==<version>
#
# Copyright 2018 Pallets
#
# Redistribution and use in source and binary forms, with or without
# modification, are permitted provided that the following conditions are
# met:
#
# 1.  Redistributions of source code must retain the above copyright
#     notice, this list of conditions and the following disclaimer.
#
# 2.  Redistributions in binary form must reproduce the above copyright
#     notice, this list of conditions and the following disclaimer in the
#     documentation and/or other materials provided with the distribution.
#
# 3.  Neither the name of the copyright holder nor the names of its
#     contributors may be used to endorse or promote products derived from
#     this software without specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS
# "AS IS" AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT
# LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
# PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT
# HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL,
# SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED
# TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
# PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF
# LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING
# NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS
# SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.

# ruff: noqa
# mypy: ignore-errors

from datetime import timedelta
from time import sleep

from cachelib.serializers import BaseSerializer
from cachelib.serializers import JSONSerializer


# -- tests/conftest.py

class TestData:
    """This class centralizes all data samples used in tests"""

    sample_numbers = [0, 10, 1024000, 9, 5000000000000, 99, 738, 2000000]
    sample_pairs = {
        "128": False,
        "beef": True,
        "crevettes": {},
        "1024": "spam",
        "bacon": "eggs",
        "sausage": 2048,
        "3072": [],
        "brandy": [{}, "fried eggs"],
        "lobster": ["baked beans", [512]],
        "4096": {"sauce": [], 256: "truffle"},
    }


# -- tests/common.py


class CommonTests(TestData):
    """A base set of tests to be run for all cache types"""

    def test_set_get(self):
        cache = self.cache_factory()
        for k, v in self.sample_pairs.items():
            assert cache.set(k, v)
            assert cache.get(k) == v

    def test_set_get_many(self):
        cache = self.cache_factory()
        result = cache.set_many(self.sample_pairs)
        assert result == list(self.sample_pairs.keys())
        values = cache.get_many(*self.sample_pairs)
        assert values == list(self.sample_pairs.values())

    def test_get_dict(self):
        cache = self.cache_factory()
        cache.set_many(self.sample_pairs)
        d = cache.get_dict(*self.sample_pairs)
        assert d == self.sample_pairs

    def test_delete(self):
        cache = self.cache_factory()
        for k, v in self.sample_pairs.items():
            cache.set(k, v)
            assert cache.delete(k)
            assert not cache.get(k)

    def test_delete_many(self):
        cache = self.cache_factory()
        cache.set_many(self.sample_pairs)
        result = cache.delete_many(*self.sample_pairs)
        assert result == list(self.sample_pairs.keys())
        assert not any(cache.get_many(*self.sample_pairs))

    def test_delete_many_ignore_errors(self):
        cache = self.cache_factory()
        cache.set("bacon", "spam")
        cache.delete_many("eggs", "bacon")
        assert cache.get("bacon") is None

    def test_delete_many_raise_errors_nonexistent_key(self):
        cache = self.cache_factory(ignore_delete_many_errors=False)
        cache.set("bacon", "spam")
        # nonexistent keys are considered deleted and must not raise
        result = cache.delete_many("eggs", "bacon")
        assert result == ["eggs", "bacon"]
        assert cache.get("bacon") is None

    def test_add(self):
        cache = self.cache_factory()
        cache.set_many(self.sample_pairs)
        for k in self.sample_pairs:
            assert not cache.add(k, "updated")
        assert cache.get_many(*self.sample_pairs) == list(self.sample_pairs.values())
        for k, v in self.sample_pairs.items():
            assert cache.add(f"{k}-new", v)
            assert cache.get(f"{k}-new") == v

    def test_inc_dec(self):
        cache = self.cache_factory()
        for n in self.sample_numbers:
            assert not cache.get(f"{n}-key-inc")
            assert cache.inc(f"{n}-key-inc", n) == n
            assert cache.get(f"{n}-key-inc") == n
            assert cache.dec(f"{n}-key-dec", n) == -n
            assert cache.get(f"{n}-key-dec") == -n
            assert cache.dec(f"{n}-key-inc", 5) == n - 5

    def test_inc_dec_after_set(self):
        cache = self.cache_factory()
        assert cache.set("count", 10)
        assert cache.inc("count", 5) == 15
        assert cache.dec("count", 3) == 12
        assert cache.get("count") == 12

    def test_bool_roundtrip(self):
        cache = self.cache_factory()
        assert cache.set("true-key", True)
        assert cache.get("true-key") is True
        assert cache.set("false-key", False)
        assert cache.get("false-key") is False

    def test_expiration(self):
        cache = self.cache_factory()
        for k, v in self.sample_pairs.items():
            cache.set(f"{k}-t0", v, timeout=0)
            cache.set(f"{k}-t1", v, timeout=1)
            # timedeltas are equivalent to the same amount of seconds
            cache.set(f"{k}-td0", v, timeout=timedelta())
            cache.set(f"{k}-td1", v, timeout=timedelta(seconds=1))
        sleep(4)
        for k, v in self.sample_pairs.items():
            assert cache.get(f"{k}-t0") == v
            assert not cache.get(f"{k}-t1")
            assert cache.get(f"{k}-td0") == v
            assert not cache.get(f"{k}-td1")


# -- tests/clear.py


class ClearTests(TestData):
    """Tests for the optional 'clear' method specified by BaseCache"""

    def test_clear(self):
        cache = self.cache_factory()
        assert cache.set_many(self.sample_pairs)
        assert cache.clear()
        assert not any(cache.get_many(*self.sample_pairs))


# -- tests/has.py


class HasTests(TestData):
    """Tests for the optional 'has' method specified by BaseCache"""

    def test_has(self):
        cache = self.cache_factory()
        assert cache.set_many(self.sample_pairs)
        for k in self.sample_pairs:
            assert cache.has(k)
        assert not cache.has("unknown")


# -- tests/serializer.py


class SerializerTests(TestData):
    """A set of tests to run on serializers used by caches"""

    def test_serializer_injection_roundtrip(self):
        cache = self.cache_factory()
        cache.serializer = JSONSerializer()
        assert cache.set("key", {"a": 1, "b": [1, 2, 3]})
        assert cache.get("key") == {"a": 1, "b": [1, 2, 3]}

    def test_serializer_injection_set_many(self):
        cache = self.cache_factory()
        cache.serializer = JSONSerializer()
        pairs = {"k1": "hello", "k2": 42, "k3": [True, None]}
        assert cache.set_many(pairs)
        assert cache.get_many(*pairs) == list(pairs.values())

    def test_serializer_is_stored_on_instance(self):
        serializer = JSONSerializer()
        cache = self.cache_factory()
        cache.serializer = serializer
        assert isinstance(cache.serializer, JSONSerializer)

    def test_serializer_injection_add(self):
        cache = self.cache_factory()
        cache.serializer = JSONSerializer()
        assert cache.add("key", {"a": 1})
        assert cache.get("key") == {"a": 1}
        assert not cache.add("key", {"b": 2})

    def test_serializer_injection_get_dict(self):
        cache = self.cache_factory()
        cache.serializer = JSONSerializer()
        pairs = {"k1": "hello", "k2": 42}
        cache.set_many(pairs)
        assert cache.get_dict(*pairs) == pairs

    def test_no_serializer_uses_default(self):
        cache = self.cache_factory()
        assert cache.set("key", b"raw bytes")
        assert cache.get("key") == b"raw bytes"


# -- tests/delete_many_with_prefix.py


class DeleteManyWithPrefixTests(TestData):
    """Tests for the 'delete_many' method when a key prefix is used"""

    def test_delete_many_with_prefix(self):
        cache = self.cache_factory(key_prefix="test_prefix:")
        cache.set_many({"foo": 1, "bar": 2, "baz": 3})
        result = cache.delete_many("foo", "bar", "baz")
        assert result == ["foo", "bar", "baz"]
        assert not any(cache.get_many("foo", "bar", "baz"))


# -- tests/test_simple_cache.py


class SillySerializer(BaseSerializer):
    """A pointless serializer only for testing"""

    def dumps(self, value):
        return repr(value).encode()

    def loads(self, bvalue):
        return eval(bvalue.decode())
