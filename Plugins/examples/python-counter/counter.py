"""An hv device plugin in Python: a 32-bit counter at four I/O ports.

A 4-byte write at the first port adds the value to the counter; a read returns it. The counter
starts at the `start` setting and survives the device being killed (it lives in the state page).
Run it with:  hvctl run --device Plugins/examples/python-counter/manifest.json,start=5 …
"""
import hvdevice  # every import happens before run(): after lock-down nothing can be opened


class Counter(hvdevice.Device):
    model = "python-counter"

    def start(self, runtime, restored):
        if not restored:
            self.value = int(runtime.settings.get("start", "0")) & 0xFFFFFFFF
        runtime.log(hvdevice.LOG_INFO, f"counter at {self.value} (restart generation {runtime.generation})")

    def read(self, resource, offset, size):
        return self.value >> (8 * offset)

    def write(self, resource, offset, size, value):
        if offset == 0:
            self.value = (self.value + value) & 0xFFFFFFFF

    def save(self):
        return self.value.to_bytes(4, "little")

    def restore(self, data):
        # Written by an earlier process of this device: take exactly four bytes or nothing.
        self.value = int.from_bytes(data, "little") if len(data) == 4 else 0


hvdevice.run(Counter)
