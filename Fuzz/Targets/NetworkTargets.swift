import HVNetSwitch

/// The private segments' learning switch, driven by frames from every port.
enum NetworkTargets {
    /// Frames from any port with any addresses, ports leaving, time passing: the switch must never
    /// send a frame back out of the port it came in on, nor to a port that has left.
    static let learningSwitch = FuzzTarget("learning-switch", covers: "learning switch forwarding table (switch ← NICs' frames)") { data in
        var table = LearningSwitch()
        var input = FuzzInput(data)
        var now: UInt64 = 0
        var gone: Set<Int> = []
        while !input.isAtEnd {
            switch input.u8() % 4 {
            case 0, 1:
                let port = input.below(8)
                let source = MACAddress(value: UInt64(input.u8() % 16) | (input.bool() ? 1 << 40 : 0))
                let destination = input.bool() ? MACAddress(value: 0xFFFF_FFFF_FFFF) : MACAddress(value: UInt64(input.u8() % 16))
                gone.remove(port)
                switch table.forward(from: port, source: source, destination: destination, now: now) {
                case .port(let out):
                    FuzzCheck.that(out != port, "a frame went back out of port \(port)")
                    FuzzCheck.that(!gone.contains(out), "a frame went to port \(out), which has left")
                default: break
                }
            case 2:
                let port = input.below(8)
                table.remove(port: port)
                gone.insert(port)
            default:
                now &+= UInt64(input.integer(UInt32.self)) * 1000
                table.age(now: now)
            }
        }
    }
}
