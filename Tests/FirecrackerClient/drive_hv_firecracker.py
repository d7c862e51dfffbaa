"""Drives hv-firecracker with a Firecracker client no one at hv wrote: the `firecracker.api`
client of the PyPI package hysn-firecracker-python, unchanged. Like a real client, it starts
the "firecracker" binary (hv-firecracker here) itself, configures machine, boot source, a drive
and a NIC, starts the instance, pauses and resumes it, snapshots it, and loads the snapshot in a
second instance, checking the guest's serial output (the binary's stdout) at each step: the
restored guest's counter carries on from the tick the snapshot caught.

usage: drive_hv_firecracker.py HV_FIRECRACKER HVCTL SOCKET ID KERNEL DISK TAP
Prints "ok" last when every check passed; exits 1 naming the first that did not.
"""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import types

# The package's __init__ imports its VM manager (docker, paramiko, pyroute2, …) and creates
# /var/lib/firecracker; its API client needs none of that, so import the client module alone.
package = types.ModuleType("firecracker")
package.__path__ = [os.path.join(sysconfig.get_paths()["purelib"], "firecracker")]
sys.modules["firecracker"] = package
from firecracker.api import Api, Resource  # noqa: E402
from firecracker.exceptions import APIError  # noqa: E402

binary, hvctl, sock, vm_id, kernel, disk, tap = sys.argv[1:8]


def fail(what):
    print("FAILED: " + what, flush=True)
    sys.exit(1)


console = []
errors = []


def collect(stream, into):
    for line in iter(stream.readline, b""):
        into.append(line.decode(errors="replace").rstrip("\n"))


def launch(instance_id):
    """Starts the "firecracker" binary as a client does, collecting its stdout and stderr."""
    started = subprocess.Popen([binary, "--api-sock", sock, "--id", instance_id],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    console.clear()
    errors.clear()
    for stream, into in ((started.stdout, console), (started.stderr, errors)):
        threading.Thread(target=collect, args=(stream, into), daemon=True).start()
    return started


def ticks():
    return sum(1 for line in console if line.startswith("tick "))


def tick_numbers():
    return [int(line.split()[1]) for line in console if line.startswith("tick ") and line.split()[1].isdigit()]


process = launch(vm_id)


def wait_for(what, condition, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            fail(f"{what}: hv-firecracker ended ({process.returncode}): {errors[-5:]}")
        time.sleep(0.02)
    fail(f"timed out waiting for {what}; stderr: {errors[-5:]}")


try:
    wait_for("the API socket", lambda: os.path.exists(sock))
    api = Api(sock)
    info = api.describe.get().json()
    if info.get("state") != "Not started" or info.get("id") != vm_id or info.get("app_name") != "Firecracker":
        fail(f"GET / before start: {info}")
    print("version:", api.version.get().json())

    api.machine_config.put(vcpu_count=1, mem_size_mib=32)
    api.boot.put(kernel_image_path=kernel, boot_args="mode=ticks count=100000 delay=50")
    api.drive.put(drive_id="rootfs", path_on_host=disk, is_root_device=True, is_read_only=False,
                  rate_limiter={"bandwidth": {"size": 10485760, "one_time_burst": 1048576, "refill_time": 1000}})
    api.network.put(iface_id="eth0", host_dev_name=tap, guest_mac="AA:FC:00:00:00:01",
                    tx_rate_limiter={"ops": {"size": 1000, "refill_time": 1000}})
    # The client has no balloon resource; its own Resource class reaches Firecracker's paths.
    balloon = Resource(api, "/balloon")
    balloon_stats = Resource(api, "/balloon/statistics")
    balloon.put(amount_mib=4, deflate_on_oom=True, stats_polling_interval_s=1)
    if balloon.get().json() != {"amount_mib": 4, "deflate_on_oom": True, "stats_polling_interval_s": 1}:
        fail(f"GET /balloon: {balloon.get().json()}")
    machine = api.machine_config.get().json()
    if machine.get("vcpu_count") != 1 or machine.get("mem_size_mib") != 32:
        fail(f"GET /machine-config: {machine}")

    # Refusals come back as the client's APIError carrying Firecracker's fault_message.
    for bad, call in (("a missing drive image", lambda: api.drive.put(drive_id="data", path_on_host="/nonexistent/disk.img",
                                                                     is_root_device=False, is_read_only=True)),
                      ("a second root drive", lambda: api.drive.put(drive_id="other", path_on_host=disk, is_root_device=True,
                                                                   is_read_only=True)),
                      ("an unknown field", lambda: api.machine_config.put(vcpu_count=1, mem_size_mib=32, cores=4)),
                      ("pausing before start", lambda: api.vm.patch(state="Paused"))):
        try:
            call()
            fail(f"{bad} was accepted")
        except APIError as e:
            print(f"refused {bad}: {e}")

    api.actions.put(action_type="InstanceStart")
    if api.describe.get().json().get("state") != "Running":
        fail("GET / after InstanceStart is not Running")
    wait_for("the guest's ticks", lambda: ticks() >= 3)

    # The VM hv runs is the one configured: hvctl's own view of it.
    status = json.loads(subprocess.run([hvctl, "status", vm_id, "--json"], check=True, capture_output=True).stdout)
    if status["memory_mib"] != 32 or status["cpus"] != 1:
        fail(f"hvctl status: memory {status['memory_mib']} MiB, {status['cpus']} vCPUs")
    if [d["path"] for d in status["disks"]] != [disk] or status["disks"][0]["readonly"]:
        fail(f"hvctl status disks: {status['disks']}")
    if [(n.get("tap"), n["mac"].lower()) for n in status["nics"]] != [(tap, "aa:fc:00:00:00:01")]:
        fail(f"hvctl status nics: {status['nics']}")
    # Firecracker's rate limiters are hv's: the disk's and the NIC's device processes enforce them.
    if status["disks"][0].get("rate_limit") != {"bandwidth": {"size": 10485760, "one_time_burst": 1048576, "refill_time_ms": 1000}}:
        fail(f"hvctl status disk rate limit: {status['disks'][0].get('rate_limit')}")
    if status["nics"][0].get("tx_rate_limit") != {"ops": {"size": 1000, "refill_time_ms": 1000}} or "rx_rate_limit" in status["nics"][0]:
        fail(f"hvctl status NIC rate limits: {status['nics'][0]}")
    # PATCHed while the VM runs: the drive's limiter is replaced; the NIC keeps tx and gains rx.
    api.drive.patch(drive_id="rootfs", rate_limiter={"ops": {"size": 500, "refill_time": 1000}})
    api.network.patch(iface_id="eth0", rx_rate_limiter={"bandwidth": {"size": 1048576, "refill_time": 100}})
    status = json.loads(subprocess.run([hvctl, "status", vm_id, "--json"], check=True, capture_output=True).stdout)
    if status["disks"][0].get("rate_limit") != {"ops": {"size": 500, "refill_time_ms": 1000}}:
        fail(f"hvctl status disk rate limit after PATCH: {status['disks'][0].get('rate_limit')}")
    if status["nics"][0].get("rx_rate_limit") != {"bandwidth": {"size": 1048576, "refill_time_ms": 100}} \
            or status["nics"][0].get("tx_rate_limit") != {"ops": {"size": 1000, "refill_time_ms": 1000}}:
        fail(f"hvctl status NIC rate limits after PATCH: {status['nics'][0]}")
    tick = ticks()
    wait_for("the guest's ticks after the PATCHes", lambda: ticks() > tick + 2)
    try:
        api.drive.patch(drive_id="rootfs", rate_limiter={"ops": {"size": 0, "refill_time": 1000}})
        fail("a rate limiter of size 0 was accepted")
    except APIError as e:
        print(f"refused a bad rate limiter: {e}")

    # The balloon is hv-balloon: hvctl sees it, PATCH /balloon resizes it while the VM runs, and
    # GET /balloon/statistics reports it (mode=ticks runs no balloon driver: it holds nothing).
    if status.get("balloon", {}).get("target_mib") != 4:
        fail(f"hvctl status balloon: {status.get('balloon')}")
    balloon.patch(amount_mib=8)
    figures = balloon_stats.get().json()
    if figures.get("target_mib") != 8 or figures.get("target_pages") != 2048 or figures.get("actual_mib") != 0:
        fail(f"GET /balloon/statistics: {figures}")
    balloon_stats.patch(stats_polling_interval_s=2)
    if balloon.get().json() != {"amount_mib": 8, "deflate_on_oom": True, "stats_polling_interval_s": 2}:
        fail(f"GET /balloon after the PATCHes: {balloon.get().json()}")
    try:
        balloon.patch(amount_mib=64)
        fail("a balloon larger than the guest was accepted")
    except APIError as e:
        print(f"refused a balloon larger than the guest: {e}")

    api.vm.patch(state="Paused")
    if api.describe.get().json().get("state") != "Paused":
        fail("GET / after pausing is not Paused")
    time.sleep(0.2)
    paused_at = ticks()
    time.sleep(0.6)
    if ticks() != paused_at:
        fail(f"the guest ticked while paused ({paused_at} → {ticks()})")
    api.vm.patch(state="Resumed")
    wait_for("ticks after resuming", lambda: ticks() >= paused_at + 3)
    if api.describe.get().json().get("state") != "Running":
        fail("GET / after resuming is not Running")
    try:
        api.boot.put(kernel_image_path=kernel)
        fail("PUT /boot-source after start was accepted")
    except APIError as e:
        print(f"refused a pre-boot change after start: {e}")
    config = api.vm_config.get().json()
    if config["drives"][0]["path_on_host"] != disk or config["network-interfaces"][0]["host_dev_name"] != tap:
        fail(f"GET /vm/config: {config}")
    # A snapshot of the paused VM (hv's is a directory; the memory file is a link into it).
    snapshot = os.path.join(os.path.dirname(sock), "snapshot")
    memory = os.path.join(os.path.dirname(sock), "snapshot.mem")
    api.vm.patch(state="Paused")
    time.sleep(0.2)
    caught = max(tick_numbers())
    api.create_snapshot.put(snapshot_path=snapshot, mem_file_path=memory, snapshot_type="Full")
    if api.describe.get().json().get("state") != "Paused":
        fail("the VM did not stay paused after its snapshot")
    api.close()

    # Firecracker's way to end an instance: signal the process. The VM stops in order.
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    if os.path.exists(sock):
        fail("the API socket outlived hv-firecracker")
    print(f"ticks seen: {ticks()}, the snapshot caught tick {caught}; exit status {process.returncode}")

    # A second instance loads it and resumes: the guest's counter goes on from where it was.
    process = launch(vm_id + "-restored")
    wait_for("the second API socket", lambda: os.path.exists(sock))
    api = Api(sock)
    api.load_snapshot.put(snapshot_path=snapshot, mem_file_path=memory, resume_vm=True)
    if api.describe.get().json().get("state") != "Running":
        fail("GET / after loading the snapshot is not Running")
    wait_for("ticks from the restored guest", lambda: len(tick_numbers()) >= 2)
    if tick_numbers()[0] != caught + 1:
        fail(f"the restored guest's first tick is {tick_numbers()[0]}, not {caught + 1}")
    print(f"restored guest ticks: {tick_numbers()[:3]}")
    api.close()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    print("ok")
except Exception:
    print("hv-firecracker's stderr:", *errors[-10:], sep="\n  ", flush=True)
    raise
finally:
    if process.poll() is None:
        process.kill()
        process.wait()
