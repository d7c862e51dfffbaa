import Glibc
import HVDeviceSDK
import HVSerialContract
import HVSerialUART

/// The 16550A serial port as a device process: guest register accesses arrive on the ring,
/// transmitted bytes go to the host output (`SerialContract.HostFile.output`), and host input
/// (`.input`, optional) feeds the receive FIFO.
///
/// Crash safety: the UART's registers live in the core-owned state page and are saved, with
/// buffered output written out first, in `flush()` — the point where the runtime commits
/// requests. A crash before that replays the uncommitted requests against the saved registers,
/// so the guest sees each access take effect once; a `ConsoleJournal` in the state page (offset
/// 2048) says how much of the replayed batch's output the dead process had already written, and
/// that much is dropped, so no byte reaches the console twice.
final class SerialDevice: DeviceModel {
    private var uart: UART16550
    private let runtime: DeviceRuntime
    private let output: FileDescriptorNumber?
    private let input: FileDescriptorNumber?
    private let irq: InterruptLine?
    private var pendingOutput: [UInt8] = []
    private var lineHigh = false
    private var inputIdle = true
    private var inputOpen = true
    /// Set once the host output fails for good: the rest is discarded, reported once.
    private var outputBroken = false
    /// Where this batch's output stands (in the state page from `journalOffset`), and how many
    /// bytes of the replayed batch the predecessor already wrote, to be dropped.
    private var journal: ConsoleJournal?
    private var skipOutput: UInt64 = 0
    private let outputIsRegular: Bool
    private static let journalOffset = 2048

    typealias FileDescriptorNumber = Int32

    init(runtime: DeviceRuntime) {
        self.runtime = runtime
        output = runtime.hostFile(SerialContract.HostFile.output)?.rawValue
        input = runtime.hostFile(SerialContract.HostFile.input)?.rawValue
        irq = runtime.interrupts[0]
        if runtime.restartGeneration > 0, let page = runtime.statePage {
            // The page survived the old process; it may have died mid-write, so sanitize.
            var restored = page.load(UART16550.self)
            restored.sanitize()
            uart = restored
        } else {
            uart = UART16550()
        }
        var st = stat()
        outputIsRegular = output.map { fstat($0, &st) == 0 && st.st_mode & S_IFMT == S_IFREG } ?? false
        if runtime.restartGeneration > 0, let page = runtime.statePage, let committed = runtime.committedRequestIndex,
           let saved = ConsoleJournal(bytes: page.loadBytes(at: Self.journalOffset, count: ConsoleJournal.byteCount)) {
            // The replay regenerates the uncommitted batch's bytes; drop those already out.
            skipOutput = saved.alreadyWritten(committed: committed, outputSize: outputSize())
            journal = saved
        }
        pendingOutput.reserveCapacity(4096)
        if let input {
            _ = fcntl(input, F_SETFL, fcntl(input, F_GETFL) | O_NONBLOCK)
            runtime.watch(fd: input, enabled: { [unowned self] in inputOpen && uart.canReceive }) { [unowned self] in
                pullInput()
            }
        }
        persist()
    }

    func read(resource: Int, offset: UInt64, size: Int) -> UInt64 {
        let value = uart.read(offset: UInt8(truncatingIfNeeded: offset))
        afterAccess()
        return UInt64(value)
    }

    func write(resource: Int, offset: UInt64, size: Int, value: UInt64) {
        if let byte = uart.write(offset: UInt8(truncatingIfNeeded: offset), value: UInt8(truncatingIfNeeded: value)) {
            if skipOutput > 0 {
                skipOutput -= 1  // written by the process that died before committing it
                afterAccess()
                return
            }
            pendingOutput.append(byte)
            if pendingOutput.count >= 4096 { writeOutput() }
        }
        afterAccess()
    }

    func flush() {
        writeOutput()
        persist()
    }

    /// The output's size, when it is a regular file.
    private func outputSize() -> UInt64? {
        guard outputIsRegular, let output else { return nil }
        var st = stat()
        return fstat(output, &st) == 0 ? UInt64(st.st_size) : nil
    }

    /// Records, before the first write of a batch, which batch and where its output starts. The
    /// tag is cleared first and set last, so a kill in between leaves no journal rather than a torn one.
    private func journalBatch() {
        guard let page = runtime.statePage, let committed = runtime.committedRequestIndex,
              journal?.batch != committed else { return }  // this batch already has its journal
        let next = ConsoleJournal.forWriting(journal, committed: committed, outputSize: outputSize())
        let bytes = next.bytes
        page.storeBytes([0, 0, 0, 0], at: Self.journalOffset)
        page.storeBytes(Array(bytes[4...]), at: Self.journalOffset + 4)
        page.storeBytes(Array(bytes[..<4]), at: Self.journalOffset)
        journal = next
    }

    private func writeOutput() {
        guard !pendingOutput.isEmpty else { return }
        if output != nil && !outputBroken { journalBatch() }
        if let output, !outputBroken {
            var offset = 0
            while offset < pendingOutput.count {
                let n = pendingOutput.withUnsafeBytes { Glibc.write(output, $0.baseAddress! + offset, $0.count - offset) }
                if n < 0 && errno == EINTR { continue }
                if n < 0 && errno == EAGAIN {
                    // A non-blocking console that is full: wait for room rather than drop bytes.
                    var p = pollfd(fd: output, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&p, 1, 100)
                    continue
                }
                if n <= 0 {
                    runtime.log(.error, "console output failed: \(String(cString: strerror(errno))); output is discarded from now on")
                    outputBroken = true
                    break
                }
                offset += n
                if var j = journal, j.base == nil, let page = runtime.statePage {
                    // A pipe or terminal keeps no size: count what reached it.
                    j.written += UInt64(n)
                    journal = j
                    page.storeBytes(Array(j.bytes[16...]), at: Self.journalOffset + 16)
                }
            }
        }
        pendingOutput.removeAll(keepingCapacity: true)
    }

    private func persist() { runtime.statePage?.store(uart) }

    /// A snapshot: everything is committed, so a restored successor replays nothing. Its ring
    /// starts again from index 0 and must not take an old batch's journal for its own: drop it.
    func quiesce() -> Bool {
        runtime.statePage?.storeBytes([0, 0, 0, 0], at: Self.journalOffset)
        journal = nil
        persist()
        return true
    }

    private func afterAccess() {
        if inputIdle { uart.receiveIdle() }
        updateInterrupt()
    }

    private func updateInterrupt() {
        let high = uart.interruptLine
        // ISA IRQ 4 is edge-triggered at the PIC: deliver the rising edge.
        if high && !lineHigh { irq?.pulse() }
        lineHigh = high
    }

    private func pullInput() {
        guard let input else { return }
        var buffer = [UInt8](repeating: 0, count: UART16550.fifoDepth)
        var room = 0
        var probe = uart
        while probe.canReceive && room < buffer.count {
            probe.receive(0)
            room += 1
        }
        guard room > 0 else { return }
        let n = buffer.withUnsafeMutableBytes { Glibc.read(input, $0.baseAddress, room) }
        if n == 0 {
            inputOpen = false  // end of input: stop watching
            inputIdle = true
        } else if n > 0 {
            for byte in buffer.prefix(n) { uart.receive(byte) }
            inputIdle = n < room
            persist()  // input consumed from the pipe must not be lost with this process
        }
        if inputIdle { uart.receiveIdle() }
        updateInterrupt()
    }
}

// State page layout (version 1): the UART16550 at 0, the console journal at 2048.
let runtime = DeviceRuntime.startOrExit(name: "serial-16550a", capabilities: [.registerRing, .statePage, .snapshot], stateVersion: 1)
runtime.run(SerialDevice(runtime: runtime))
