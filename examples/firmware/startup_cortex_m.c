/* Minimal Cortex-M startup for QEMU's mps2 boards: vector table, copy .data, zero .bss,
 * enable the FPU, set up semihosting, call main, report the exit code to QEMU. */
#include <stdint.h>

extern uint32_t __etext, __data_start__, __data_end__, __bss_start__, __bss_end__, __StackTop;
extern int main(void);
extern void initialise_monitor_handles(void);
extern void exit(int);

void Reset_Handler(void);
void Default_Handler(void);
void _init(void) {}
void _fini(void) {}

__attribute__((section(".isr_vector"), used)) void (*const vector_table[16])(void) = {
    (void (*)(void))(&__StackTop), Reset_Handler, Default_Handler, Default_Handler, Default_Handler,
    Default_Handler, Default_Handler, 0, 0, 0, 0, Default_Handler, Default_Handler, 0, Default_Handler,
    Default_Handler,
};

void Default_Handler(void) {
  for (;;) {
  }
}

void Reset_Handler(void) {
  uint32_t* src = &__etext;
  uint32_t* dst = &__data_start__;
  while (dst < &__data_end__) *dst++ = *src++;
  for (dst = &__bss_start__; dst < &__bss_end__; ++dst) *dst = 0;
  /* CPACR: full access to CP10 and CP11 (the FPU) */
  *(volatile uint32_t*)0xE000ED88 |= (0xFu << 20);
  __asm volatile("dsb\n isb");
  initialise_monitor_handles();
  exit(main());
}
