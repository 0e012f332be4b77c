package runtime

import "testing"

func TestCheckMountPath(t *testing.T) {
	for p, ok := range map[string]bool{
		"/data": true, "/home/user/data": true, "/mnt/v-1_x": true, "/procfs": true, "/devices": true,
		"": false, "data": false, "/": false, "/data/": false, "/a/../b": false, "/a//b": false,
		"/proc": false, "/proc/x": false, "/dev": false, "/dev/shm": false, "/sys": false, "/sys/fs": false,
		"/.cubicle": false, "/.cubicle/envd": false, "/a\x00b": false,
	} {
		if err := CheckMountPath(p); (err == nil) != ok {
			t.Errorf("CheckMountPath(%q) = %v, want ok=%v", p, err, ok)
		}
	}
}

func TestCheckVolumes(t *testing.T) {
	for _, tc := range []struct {
		name string
		vs   []VolumeMount
		ok   bool
	}{
		{"none", nil, true},
		{"two apart", []VolumeMount{{"/v/a", "/a"}, {"/v/b", "/b"}}, true},
		{"same volume twice", []VolumeMount{{"/v/a", "/a"}, {"/v/a", "/b"}}, true},
		{"same path", []VolumeMount{{"/v/a", "/a"}, {"/v/b", "/a"}}, false},
		{"nested", []VolumeMount{{"/v/a", "/a"}, {"/v/b", "/a/b"}}, false},
		{"nested the other way", []VolumeMount{{"/v/a", "/a/b"}, {"/v/b", "/a"}}, false},
		{"prefix is not nesting", []VolumeMount{{"/v/a", "/a"}, {"/v/b", "/ab"}}, true},
		{"relative host dir", []VolumeMount{{"v/a", "/a"}}, false},
		{"bad path", []VolumeMount{{"/v/a", "/proc"}}, false},
	} {
		if err := CheckVolumes(tc.vs); (err == nil) != tc.ok {
			t.Errorf("%s: CheckVolumes = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}
